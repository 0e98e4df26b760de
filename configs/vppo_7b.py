"""VPPO on Qwen2.5-VL-7B-Instruct with ViRL39K: the paper's main recipe (Table 1, 57.5 avg@8).

    python scripts/convert_hf_to_jax.py --hf_dir=Qwen/Qwen2.5-VL-7B-Instruct --out=ckpt/qwen7b --dtype=bfloat16
    python -m vppo_jax.train --config=configs/vppo_7b.py --workdir=runs/vppo_7b \
        --config.model.path=ckpt/qwen7b --config.data.train_files="('virl39k.parquet',)"

Two epochs of ViRL39K at 384 prompts per step (202 rollout steps, 606 optimizer updates),
computed in bf16 on fp32 master weights (`model.param_dtype="bfloat16"` halves the state,
with Kahan-compensated AdamW). Hardware: the reference used 8 GPUs (15.5 h for DAPO, 17.0 h
for VPPO). Shrink the same recipe to a CPU smoke run with `--config=configs/vppo_7b.py:runlocal`.
"""

from vppo_jax.trainer.config import default_config, parse_arg


def get_config(arg: str = ""):
    config = default_config()  # the defaults are this recipe
    # Every device holds 1/n of the weights and optimizer state and decodes/trains 1/n of the
    # rows (FSDP); `python -m vppo_jax.plan` prints what this needs per device.
    config.mesh.fsdp = -1
    # The update's memory: each layer's backward keeps only its input, and each device takes one
    # 6144-token bin per micro-batch (packed: a prompt once, then its samples' responses; the
    # longest prompt and response fit one), as many micro-batches as the rollout's tokens fill.
    # XLA:CPU's figures for v5p-32 at 600-token responses on average (docs/results.md):
    #   python -m vppo_jax.plan --config=configs/vppo_7b.py --model=7b --topology=v5p-32 --response_tokens=600
    #   8 micro-batches; update 26.5, scoring 26.5, prefill 10.8, decode 34.8 GiB per chip.
    # Padded rows (train.packing=False: one 6144-token row per device, 64 micro-batches on
    # v5p-32), by the TPU compiler: update 26.9, scoring 14.2, prefill 5.7, decode 19.2 GiB.
    config.model.remat = "full"
    config.train.micro_batches = 0
    config.train.micro_batch_tokens = 6144
    # The sampler in waves of 16 prompts (24 per round): the prefill's temporaries grow by 16-18
    # GiB per device for each prompt per device (4096-token prompts, a 980 x 980 image each), so
    # 16 is what fits 8xh100 with headroom (prefill 50.3, decode 46.9 of 80 GiB; 32: 79.5).
    config.rollout.wave_prompts = 16
    if parse_arg(arg, runlocal=False).runlocal:
        config.rollout.prompts_per_step = 4
        config.rollout.group_size = 4
        config.rollout.max_new_tokens = 32
        config.train.steps = 2
        config.train.updates_per_rollout = 1
        config.train.micro_batches = 1
    return config
