"""The differentiable part of a training step, the module DDP (or FSDP) wraps: inputs -> one loss per sample.

    TrainStep   text encoders + UNet -> the diffusion loss (eps or v, Min-SNR weighted), per sample
    VAEStep     the "vae" task: reconstruction MSE + kl_weight * KL, per sample

The loop (train/dreambooth.py) weights the class samples' losses by prior_loss_weight and averages.
"""

import torch
import torch.nn as nn

from models.conditioning import encode_text, vector_condition
from train.regularisers import elementwise_loss


class TrainStep(nn.Module):
    """The differentiable part of a step, wrapped in DDP: text encoders + UNet -> per-sample loss. A LoRA
    run's adapters are registered here too, so that DDP all-reduces their gradients; their hooks sit
    inside the modules they change. With cached_text (cache_text_embeddings) the encoders ran once before
    training and are not part of the step."""

    def __init__(self, model, adapters=None, cached_text=False, loss_type="l2", controlnet=None):
        super().__init__()
        self.unet, self.lora, self.cached_text, self.loss_type = model.unet, adapters, cached_text, loss_type
        self.controlnet = controlnet  # task="controlnet": the trainee, whose residuals the frozen UNet adds
        if not cached_text:
            self.text_encoder_1, self.text_encoder_2 = model.text_encoder_1, model.text_encoder_2
        self.micro_cond_dim = model.config.unet.micro_cond_dim

    def forward(self, text, numbers, noisy, t, target, weight, text_kept, huber_c=None, mask=None, control=None):
        """text: token ids (N, 77) from each tokenizer; with cached_text, the encoders' outputs for them; huber_c
        (N,) for the pseudo-Huber losses; mask (N, 1, h, w) weights the loss per latent pixel (masked_loss);
        control (N, 3, H, W) the ControlNet's control maps."""
        context, pooled = text if self.cached_text else encode_text(self.text_encoder_1, self.text_encoder_2, *text)
        # Caption dropout zeroes the text conditioning, as the pipeline's zero negative does at inference.
        context, pooled = context * text_kept[:, None, None], pooled * text_kept[:, None]
        y = vector_condition(pooled, numbers, self.micro_cond_dim)
        residuals = self.controlnet(noisy, t, context, y, control) if self.controlnet is not None else None
        prediction = self.unet(noisy, t, context, y, control=residuals)
        loss = elementwise_loss(prediction.float() - target.float(), self.loss_type, huber_c)  # (N, C, h, w)
        if mask is not None:  # not divided by the mask's area, as kohya's apply_masked_loss
            loss = loss * mask
        return loss.mean(dim=(1, 2, 3)) * weight  # (N,)


class VAEStep(nn.Module):
    """The "vae" task, for pretraining a VAE with this same loop: reconstruction MSE + kl_weight * KL.

    (sgm uses L1 plus a perceptual and a GAN loss. On the tiny model L1 alone trained slower: at step
    750 of 1500 its reconstructions had about 40% more squared error than an MSE run's.)"""

    def __init__(self, vae, kl_weight):
        super().__init__()
        self.vae, self.kl_weight = vae, kl_weight

    def forward(self, pixels, eps):
        mean, logvar = self.vae.encode(pixels)  # (N, z, h, w) each
        reconstruction = self.vae.decode(mean + torch.exp(0.5 * logvar) * eps)
        kl = 0.5 * (mean**2 + logvar.exp() - 1 - logvar).sum(dim=(1, 2, 3))  # KL(q(z|x) || N(0, I))
        return ((reconstruction.float() - pixels) ** 2).mean(dim=(1, 2, 3)) + self.kl_weight * kl  # (N,)
