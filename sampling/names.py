"""Sampler and schedule names: ComfyUI's (what --sampler and --schedule take) and AUTOMATIC1111's (what a PNG's
parameters say), and the way from one to the other. No torch here: the command line reads it before anything loads.

    SAMPLER_NAMES, SCHEDULE_NAMES   ComfyUI's names, as sampling.samplers.SAMPLERS and sampling.sigmas.SCHEDULES
    sampler_label, schedule_label   ours -> AUTOMATIC1111's labels ("dpmpp_2m" -> "DPM++ 2M", "karras" -> "Karras")
    read_sampler                    AUTOMATIC1111's / Forge's Sampler and Schedule type -> ours, old combined names
                                    ("DPM++ 2M Karras") and "Automatic" included
"""

SAMPLER_NAMES = ("euler", "euler_ancestral", "euler_cfg_pp", "euler_ancestral_cfg_pp", "heun", "dpm_2", "dpm_2_ancestral", "lms", "dpmpp_2s_ancestral",
                 "dpmpp_sde", "dpmpp_2m", "dpmpp_2m_sde", "dpmpp_2m_sde_heun", "dpmpp_3m_sde", "uni_pc", "uni_pc_bh2",
                 "lcm", "tcd", "ddim", "ddpm")
ALIASES = {"euler_a": "euler_ancestral"}  # plainxl's earlier name, still accepted
SCHEDULE_NAMES = ("normal", "karras", "exponential", "sgm_uniform", "simple", "ddim_uniform", "beta", "kl_optimal",
                  "align_your_steps")
SPACED_SAMPLERS = ("euler", "euler_ancestral", "dpmpp_2m", "ddim", "ddpm")  # default: diffusers' spaced schedule
DIFFUSERS_SAMPLERS = (*SPACED_SAMPLERS, "lcm", "tcd")  # "default": diffusers' scheduler's own (LCM's, TCD's too)
# noise from each image's generator
NOISY = {"euler_ancestral", "euler_ancestral_cfg_pp", "dpm_2_ancestral", "dpmpp_2s_ancestral", "lcm", "tcd", "ddpm"}
SDE = {"dpmpp_sde", "dpmpp_2m_sde", "dpmpp_2m_sde_heun", "dpmpp_3m_sde"}  # noise from each image's Brownian tree
WITH_ETA = (NOISY | SDE) - {"lcm", "tcd", "ddpm"}  # the samplers that take eta and s_noise
CFG_PP = {"euler_cfg_pp", "euler_ancestral_cfg_pp"}  # they step with the unconditional prediction too
SECOND_ORDER = {"heun", "dpm_2", "dpm_2_ancestral", "dpmpp_2s_ancestral", "dpmpp_sde"}  # two denoiser calls a step

# AUTOMATIC1111 1.10's labels (Forge adds DDPM; the CFG++ ones are reForge's); uni_pc_bh2 is "UniPC" with
# "UniPC variant: bh2".
SAMPLER_LABELS = {
    "euler": "Euler", "euler_ancestral": "Euler a", "euler_cfg_pp": "Euler CFG++",
    "euler_ancestral_cfg_pp": "Euler a CFG++", "heun": "Heun", "dpm_2": "DPM2", "dpm_2_ancestral": "DPM2 a",
    "lms": "LMS", "dpmpp_2s_ancestral": "DPM++ 2S a", "dpmpp_sde": "DPM++ SDE", "dpmpp_2m": "DPM++ 2M",
    "dpmpp_2m_sde": "DPM++ 2M SDE", "dpmpp_2m_sde_heun": "DPM++ 2M SDE Heun", "dpmpp_3m_sde": "DPM++ 3M SDE",
    "uni_pc": "UniPC", "uni_pc_bh2": "UniPC", "lcm": "LCM", "tcd": "TCD", "ddim": "DDIM", "ddpm": "DDPM",
}
# AUTOMATIC1111's own aliases (its k_ names), read on input as its samplers_map does.
A1111_ALIASES = {"k_euler": "euler", "k_euler_a": "euler_ancestral", "k_euler_ancestral": "euler_ancestral",
                 "k_heun": "heun", "k_dpm_2": "dpm_2", "k_dpm_2_a": "dpm_2_ancestral", "k_lms": "lms",
                 "k_dpmpp_2s_a": "dpmpp_2s_ancestral", "k_dpmpp_sde": "dpmpp_sde", "k_dpmpp_2m": "dpmpp_2m",
                 "k_dpmpp_2m_sde": "dpmpp_2m_sde", "k_dpmpp_2m_sde_heun": "dpmpp_2m_sde_heun",
                 "k_dpmpp_3m_sde": "dpmpp_3m_sde", "unipc": "uni_pc", "k_lcm": "lcm"}
SCHEDULE_LABELS = {"normal": "Normal", "karras": "Karras", "exponential": "Exponential", "sgm_uniform": "SGM Uniform",
                   "simple": "Simple", "ddim_uniform": "DDIM", "beta": "Beta", "kl_optimal": "KL Optimal",
                   "align_your_steps": "Align Your Steps"}
# Labels read on input besides the above: A1111's "Uniform" is k-diffusion's own discretisation, even in timestep
# from the last to the first, which is ComfyUI's normal; "SGMUniform" is an alias A1111 keeps.
SCHEDULE_INPUT = {**{label: name for name, label in SCHEDULE_LABELS.items()}, "Uniform": "normal",
                  "SGMUniform": "sgm_uniform", **{name: name for name in SCHEDULE_NAMES}, "uniform": "normal",
                  "ddim": "ddim_uniform"}
# A1111's schedules we do not have: named so that a PNG with one gets a clear refusal rather than another schedule.
UNSUPPORTED_SCHEDULES = ("Polyexponential", "polyexponential", "Turbo", "turbo", "Align Your Steps GITS",
                         "Align Your Steps 11", "Align Your Steps 32")
# What A1111's "Automatic" schedule is per sampler (its samplers' 'scheduler' option); the rest use the model's
# own discretisation (normal). DDIM and DDPM run on their own timesteps there: diffusers' schedule here.
A1111_AUTOMATIC = {"dpmpp_2m": "karras", "dpmpp_sde": "karras", "dpmpp_2s_ancestral": "karras", "dpm_2": "karras",
                   "dpm_2_ancestral": "karras", "dpmpp_2m_sde": "exponential", "dpmpp_2m_sde_heun": "exponential",
                   "dpmpp_3m_sde": "exponential", "ddim": "default", "ddpm": "default", "tcd": "default"}


def canonical_sampler(name):
    return ALIASES.get(name, name)


def sampler_label(name):
    return SAMPLER_LABELS[canonical_sampler(name)]


def resolved_schedule(sampler, schedule):
    """The schedule a run really uses: "default" is diffusers' for the diffusers samplers, normal for the rest."""
    if schedule == "default" and canonical_sampler(sampler) not in DIFFUSERS_SAMPLERS:
        return "normal"
    return schedule


def read_sampler(sampler_text, schedule_text=None, variant=None):
    """AUTOMATIC1111's Sampler (a label, one of its k_ aliases or a ComfyUI name) and Schedule type -> (sampler,
    schedule), as its get_sampler_and_scheduler reads them: a schedule named at the end of the sampler ("DPM++ 2M
    Karras", the pre-1.9 combined names) wins over Schedule type; "Automatic" (or none) is the sampler's own.
    Raises ValueError naming what is not known here."""
    text = sampler_text.strip()
    for label in sorted([*SCHEDULE_INPUT, *UNSUPPORTED_SCHEDULES], key=len, reverse=True):
        if text.endswith(" " + label) and text[: -len(label) - 1] in _SAMPLER_INPUT:
            text, schedule_text = text[: -len(label) - 1], label
            break
    if text not in _SAMPLER_INPUT:
        raise ValueError(f"its sampler {sampler_text!r} is not one of {', '.join(dict.fromkeys(SAMPLER_LABELS.values()))}")
    sampler = _SAMPLER_INPUT[text]
    if sampler == "uni_pc" and variant == "bh2":
        sampler = "uni_pc_bh2"
    if schedule_text in (None, "", "Automatic", "automatic"):
        return sampler, A1111_AUTOMATIC.get(sampler, "normal")
    if schedule_text not in SCHEDULE_INPUT:
        raise ValueError(f"its schedule type {schedule_text!r} is not implemented here; the schedules are "
                         f"{', '.join(SCHEDULE_LABELS.values())} (and Uniform, Automatic)")
    return sampler, SCHEDULE_INPUT[schedule_text]


_SAMPLER_INPUT = {**{label: name for name, label in SAMPLER_LABELS.items() if name != "uni_pc_bh2"},
                  **A1111_ALIASES, **{name: name for name in SAMPLER_NAMES}, **ALIASES}
