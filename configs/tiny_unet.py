# Stage 2 of the bundled tiny model: UNet and both text encoders from scratch on captioned procedural
# portraits (prior preservation off: plain fine-tuning), starting from stage 1's export.
#   python -m train.dreambooth --config configs/tiny_unet.py
config = dict(
    model="runs/tiny/vae/model.safetensors",
    instance_data_dir="runs/tiny/portraits",  # NNNNN.png + NNNNN.txt captions
    prior_loss_weight=0.0,
    train=["unet", "text_encoder_1", "text_encoder_2"],
    resolution=64,
    center_crop=True,
    random_flip=False,
    batch_size=32,
    max_steps=3000,
    lr=1e-3,
    lr_schedule="cosine",
    warmup_steps=100,
    weight_decay=0.0,
    checkpoint_every=250,
    export_dtype="fp16",
    output_dir="runs/tiny/unet",
)
