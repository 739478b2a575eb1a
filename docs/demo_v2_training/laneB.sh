T="python train.py --preset demo --data tests/data/cmu_small_region.svs --out runs/demo2/ck --cache runs/layout_cache --init checkpoints/demo --batch 16 --lr 2e-4 --ema 0.995 --threads 1 --keep 0 --log-every 50"
$T --stage 2 --level 1 --max-steps 3000
$T --stage 2 --level 2 --max-steps 5150
$T --stage 2 --level 2 --max-steps 5200 --crop 256 --batch 4 --ema 0.99
