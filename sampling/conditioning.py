"""Settings -> the (context, y) pairs the UNet is conditioned on, for the positive and the negative prompt.

Follows diffusers' StableDiffusionXLPipeline.encode_prompt and _get_add_time_ids, knob for knob:

    prompt, prompt_2            CLIP-L reads prompt, bigG prompt_2 (None: prompt). A refiner's only encoder,
                                bigG, reads prompt (diffusers zips [prompt, prompt_2] with its one tokenizer).
    negative_prompt(_2)         the same for the negative; no negative prompt gives zeros where the model's
                                force_zeros_for_empty_prompt says so (negative_prompt_2 does not count), else "".
    prompt_embeds, ...          precomputed context (B, 77k, C) and pooled (B, P) tensors instead of text
                                (Python only); B is 1 or num_images.
    sizes, aesthetic score      the micro-conditioning numbers: original size, crop, then the target size, or
                                the aesthetic score where the model requires it (a refiner).

Textual-inversion embeddings reach the text through `pipe.embeddings` (models/embeddings.py).
"""

from dataclasses import replace

import torch

from models.conditioning import size_numbers, vector_condition
from models.files import LoadError
from sampling.names import CFG_PP, canonical_sampler
from sampling.prompt_editing import prompt_schedule, text_at
from sampling.prompts import encode_prompts, num_chunks


def edited_conditioning(pipe, s, calls, first_pass_steps=None):
    """[(last denoiser call, cond, uncond)]: the conditioning while the call counter is <= its last call, for
    AUTOMATIC1111's prompt editing over `calls` calls (one entry without editing; each text encoded once)."""
    edit = lambda prompt: (prompt_schedule(prompt, calls, first_pass_steps) if s.prompt_weights and prompt is not None  # noqa: E731
                           else [(calls, prompt)])  # (None: precomputed prompt_embeds)
    positive = edit(s.prompt)
    negative = edit(s.negative_prompt) if s.negative_prompt is not None else [(calls, None)]
    encoded, edits = {}, []
    for last in sorted({end for end, _ in positive} | {end for end, _ in negative}):
        texts = (text_at(positive, last), text_at(negative, last))
        if texts not in encoded:
            encoded[texts] = pipe.conditioning(replace(s, prompt=texts[0], negative_prompt=texts[1]))
        edits.append((last, *encoded[texts]))
    return edits


def pooled_width(config):
    """The size of bigG's pooled vector: its projection's, else its width."""
    return config.text_encoder_2.projection_dim or config.text_encoder_2.width


def check_micro_conditioning(config, requires_aesthetics_score):
    """The UNet's vector input fits the micro-conditioning numbers: 6 (sizes) or 5 (an aesthetic score last)."""
    numbers = 5 if requires_aesthetics_score else 6
    width = pooled_width(config) + numbers * config.unet.micro_cond_dim
    if width != config.unet.adm_in_channels:
        raise LoadError(f"the UNet takes a {config.unet.adm_in_channels}-wide vector condition, but with "
                        f"requires_aesthetics_score={str(requires_aesthetics_score).lower()} it would get {width}; "
                        f"set it to {str(not requires_aesthetics_score).lower()} in the folder's model_index.json")


def check_tokenizers(model, tokenizers):
    """Every id a tokenizer gives has a row in its text encoder (a folder's own vocabulary may be larger)."""
    encoders = [(model.config.text_encoder_1, tokenizers[0]), (model.config.text_encoder_2, tokenizers[1])]
    for encoder, tokenizer in ((e, t) for e, t in encoders if e is not None):
        if len(tokenizer) > encoder.vocab_size:
            raise LoadError(f"the tokenizer has {len(tokenizer)} tokens but its text encoder only {encoder.vocab_size} "
                            "token embeddings; give the model's own tokenizer folders (tokenizer/, tokenizer_2/)")


def check_embeds(s, config, refiner_config=None):
    """Precomputed conditioning (Settings.prompt_embeds ...) comes in pairs, instead of text, of this model's widths."""
    pairs = [("prompt_embeds", s.prompt_embeds, s.pooled_prompt_embeds, s.prompt or s.prompt_2),
             ("negative_prompt_embeds", s.negative_prompt_embeds, s.negative_pooled_prompt_embeds,
              s.negative_prompt or s.negative_prompt_2)]
    widths = (config.unet.context_dim, pooled_width(config))
    for name, context, pooled, text in pairs:
        if context is None and pooled is None:
            continue
        if context is None or pooled is None:
            raise ValueError(f"{name} and its pooled embeddings come together; give both (diffusers' rule)")
        if text:
            raise ValueError(f"{name} replaces the text; leave the prompt (and prompt_2) empty")
        if context.ndim != 3 or context.shape[1] % 77 or (context.shape[2], pooled.shape[-1]) != widths:
            raise ValueError(f"{name} is {tuple(context.shape)} with pooled {tuple(pooled.shape)}; this model takes "
                             f"(B, 77k, {widths[0]}) and (B, {widths[1]})")
    if refiner_config is not None and s.prompt_embeds is not None:
        raise ValueError("precomputed embeddings are one model's; run the base and the refiner as two calls")


def batch_of(tensor, B, name):
    """A precomputed embedding of batch 1 or B -> batch B."""
    if tensor.shape[0] not in (1, B):
        raise ValueError(f"{name} has a batch of {tensor.shape[0]}; give 1 or num_images = {B}")
    return tensor.expand(B, *tensor.shape[1:])


def per_encoder(pipe, prompt, prompt_2):
    """The text each tokenizer reads, (CLIP-L's, bigG's): a refiner's bigG reads prompt, as in diffusers."""
    return (prompt, prompt if pipe.is_refiner else prompt_2 or prompt)  # diffusers: prompt_2 or prompt


def encode(pipe, s, texts, chunks):
    """The texts of per_encoder -> context (1, 77 * chunks, C), pooled (1, P)."""
    return encode_prompts(pipe.model, pipe.tokenizers, [texts[0]], s.truncate_prompt, chunks, s.prompt_weights,
                          pipe.embeddings, prompts_2=[texts[1]], clip_skip=s.clip_skip or 0)


def encode_conditioning(pipe, s):
    """(cond, uncond) as (context, y) pairs, batch num_images; uncond is None without guidance."""
    B, weighted, truncate = s.num_images, s.prompt_weights, s.truncate_prompt
    positive = per_encoder(pipe, s.prompt, s.prompt_2)
    negative = per_encoder(pipe, s.negative_prompt or "", s.negative_prompt_2 or s.negative_prompt or "")
    # As many 77-token windows as the longest text needs, for all of them: CFG stacks the two batches.
    texts_to_encode = (negative,) if s.prompt_embeds is not None else (positive, negative)  # (prompt may be None)
    chunks = max(num_chunks([tokenizer], text, truncate, weighted, pipe.embeddings)
                 for texts in texts_to_encode for tokenizer, text in zip(pipe.tokenizers, texts))
    if s.prompt_embeds is not None:  # diffusers' prompt_embeds / pooled_prompt_embeds
        context, pooled = batch_of(s.prompt_embeds, B, "prompt_embeds"), batch_of(s.pooled_prompt_embeds, B, "pooled_prompt_embeds")
        chunks = max(chunks, context.shape[1] // 77)  # a negative to encode gets as many windows
    else:  # one prompt for the whole batch: encode it once, repeat it B times
        context, pooled = encode(pipe, s, positive, chunks)
        context, pooled = context.repeat(B, 1, 1), pooled.repeat(B, 1)
    aesthetic = pipe.requires_aesthetics_score
    sizes = (s.original_size or (s.height, s.width), s.crop_top_left, s.target_size or (s.height, s.width))
    numbers = size_numbers(*sizes, s.aesthetic_score if aesthetic else None)
    dim = pipe.model.config.unet.micro_cond_dim
    cond = (context, vector_condition(pooled, numbers, dim))
    if s.cfg <= 1 and canonical_sampler(s.sampler) not in CFG_PP:  # CFG++ steps with the negative at cfg 1 too
        return cond, None
    if s.negative_prompt_embeds is not None:
        neg_context = batch_of(s.negative_prompt_embeds, B, "negative_prompt_embeds")
        neg_pooled = batch_of(s.negative_pooled_prompt_embeds, B, "negative_pooled_prompt_embeds")
    elif s.negative_prompt is None and pipe.force_zeros:
        # SDXL's force_zeros_for_empty_prompt: no negative prompt means zero conditioning,
        # not the encoding of "" (AUTOMATIC1111 and ComfyUI encode "" instead).
        neg_context, neg_pooled = torch.zeros_like(context), torch.zeros_like(pooled)
    else:
        neg_context, neg_pooled = encode(pipe, s, negative, chunks)
        neg_context, neg_pooled = neg_context.repeat(B, 1, 1), neg_pooled.repeat(B, 1)
    if s.negative_original_size and s.negative_target_size:  # diffusers' rule: both, or the positive's
        sizes = (s.negative_original_size, s.negative_crop_top_left, s.negative_target_size)
    neg_numbers = size_numbers(*sizes, s.negative_aesthetic_score if aesthetic else None)
    return cond, (neg_context, vector_condition(neg_pooled, neg_numbers, dim))
