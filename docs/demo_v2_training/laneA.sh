T="python train.py --preset demo --data tests/data/cmu_small_region.svs --out runs/demo2/ck --cache runs/layout_cache --init checkpoints/demo --batch 16 --lr 2e-4 --ema 0.995 --threads 1 --keep 0 --log-every 50"
$T --stage 1 --level 0 --max-steps 4000
$T --stage 1 --level 1 --max-steps 2500
$T --stage 1 --level 2 --max-steps 8150
$T --stage 1 --level 2 --max-steps 8200 --crop 256 --batch 4 --ema 0.99
