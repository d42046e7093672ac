"""Speed and quality of the opt-in accelerations (ToMe, DeepCache) on the bundled model.

For every ``sfumato eval shapes`` prompt (prompt k with seed k, 20 Euler steps, CFG 7, as
``evaluate_model``) each setting makes one image, the settings interleaved per prompt so that load
from other processes hits them alike; the images are judged as ``eval shapes`` judges them. Prints,
per setting: seconds per image, speed-up over plain, the "fully right" fraction and the mean
absolute difference from the plain image (0–255 channel values).

With ``--sd1``, also one SD 1.x-size UNet call (random weights, fp32, 64×64 latent, batch 2 =
a CFG pair): plain, ToMe 0.5, and a DeepCache cached pass (speed only; ~3.4 GB of weights).

    python bench/accelerations.py [--prompts N] [--threads 1] [--json out.json] [--sd1]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

SETTINGS: dict[str, dict] = {
    "plain": {},
    "--tome 0.5": {"tome_ratio": 0.5},
    "--deepcache 2": {"deepcache_interval": 2},
    "--deepcache 3": {"deepcache_interval": 3},
    "--tome 0.5 --deepcache 2": {"tome_ratio": 0.5, "deepcache_interval": 2},
}


def bench_bundled(prompts: int | None) -> dict[str, dict]:
    from sfumato.api import load
    from sfumato.train.bundled import BUNDLED_PATH
    from sfumato.train.judge import evaluate
    from sfumato.train.shapes import EVAL_PROMPTS

    chosen = EVAL_PROMPTS[:prompts] if prompts else EVAL_PROMPTS
    pipe = load(BUNDLED_PATH)
    pipe.txt2img(chosen[0], steps=20, seed=0, watermark=False)           # warm-up
    seconds = dict.fromkeys(SETTINGS, 0.0)
    diff = dict.fromkeys(SETTINGS, 0.0)
    images: dict[str, dict[str, np.ndarray]] = {name: {} for name in SETTINGS}
    for k, prompt in enumerate(chosen):
        for name, settings in SETTINGS.items():
            start = time.perf_counter()
            image = pipe.txt2img(prompt, steps=20, cfg_scale=7.0, seed=k, watermark=False, **settings).images[0]
            seconds[name] += time.perf_counter() - start
            images[name][prompt] = np.asarray(image.convert("RGB"))
            diff[name] += np.abs(images[name][prompt].astype(float) - images["plain"][prompt]).mean()
    results = {}
    for name in SETTINGS:
        report = evaluate(images[name])["all"]
        results[name] = {"s_per_image": seconds[name] / len(chosen), "speedup": seconds["plain"] / seconds[name],
                         "all_ok": report["all_ok"], "mean_abs_diff": diff[name] / len(chosen), "n": len(chosen)}
    return results


def bench_sd1() -> dict[str, float]:
    from sfumato.adapters.tome import token_merging
    from sfumato.diffusion.deepcache import deep_cache
    from sfumato.models.unet import SD1_UNET, UNetModel

    torch.manual_seed(0)
    unet = UNetModel(SD1_UNET).eval()
    x, t, ctx = torch.randn(2, 4, 64, 64), torch.full((2,), 500.0), torch.randn(2, 77, 768)
    times: dict[str, list[float]] = {}

    def timed(name: str, fn) -> None:
        start = time.perf_counter()
        fn()
        times.setdefault(name, []).append(time.perf_counter() - start)

    def tome() -> None:
        with token_merging(unet, 0.5):
            unet(x, t, ctx)

    with torch.no_grad():
        unet(x, t, ctx)
        for _ in range(2):
            timed("plain", lambda: unet(x, t, ctx))
            timed("--tome 0.5", tome)
            with deep_cache(unet, 2) as cache:
                run = cache.wrap(lambda xx, s: unet(xx, t, ctx))
                run(x, None)
                timed("--deepcache, cached pass", lambda: run(x, None))
    return {name: min(v) for name, v in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--prompts", type=int, help="only the first N eval prompts (default: all 128)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", type=Path)
    ap.add_argument("--sd1", action="store_true", help="also an SD 1.x-size UNet call (speed only)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    results: dict = {"bundled": bench_bundled(args.prompts)}
    print(f"{'setting':<28}{'s/image':>9}{'speed-up':>10}{'fully right':>13}{'mean |Δ|':>10}")
    for name, row in results["bundled"].items():
        print(f"{name:<28}{row['s_per_image']:>9.3f}{row['speedup']:>9.2f}×{100 * row['all_ok']:>12.1f}%"
              f"{row['mean_abs_diff']:>10.2f}")
    if args.sd1:
        results["sd1"] = bench_sd1()
        for name, seconds in results["sd1"].items():
            print(f"SD1-size UNet call, {name}: {seconds:.1f} s")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
