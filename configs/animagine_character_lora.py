# LoRA DreamBooth of one anime character on animagine-xl-4.0: animagine_character.py's run and data,
# with rank-32 adapters on kohya's default UNet set over a bf16 base instead of the UNet itself. The
# full-size step is estimated at 11.6 GiB on the meta device (tests/benchmarks/bench_train_step.py; not
# yet measured on a GPU): a 16 GB GPU should do.
#   python -m train.dreambooth --config configs/animagine_character_lora.py --instance_data_dir=my_character
#   python -m sampling.generate --model cagliostrolab/animagine-xl-4.0 --lora runs/my_character_lora/lora.safetensors \
#       --prompt "1girl, sks, solo, smile, beach" --dtype fp16 --device cuda
from configs.animagine_character import config as full_fine_tuning

config = full_fine_tuning | dict(
    lr=1e-4,  # kohya's usual LoRA rate; full fine-tuning uses 2e-6
    lora_rank=32,
    lora_alpha=32,
    base_dtype="bf16",
    output_dir="runs/my_character_lora",
)
