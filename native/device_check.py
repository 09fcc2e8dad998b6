"""The checks and measurements of ``native/device-check.sh``, run after its build (see there).

1. Random-weight GGUFs: the tests' tiny llama, and one shaped like Qwen2.5-0.5B (24 layers,
   14 query heads over 2 KV heads of 64, 896 wide, vocabulary 151,936; f16 weights).
2. Evidence at the event equals the per-step side branch on this backend: flash attention on and
   off, f16 and q8_0 K, a prompt batch, single steps and after an eviction (the same comparison as
   tests/test_event_evidence.py, on the Qwen-shaped model); then the evidence, per-row and
   cell-move test files themselves under pytest (the tiny-model cases; SmolLM2 and gemma3 are not
   carried). On a GPU, row and cell moves take the backend's read-and-write path.
3. Decode speed: depths 512 and 4096, the full cache against budget 256 with StreamingLLM (observes
   nothing), TOVA and TOVA under AMS, with evidence at the event and by the side branch.

Everything goes into one markdown file (and the raw numbers into a JSON file beside it).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

QWEN_SHAPE = dict(n_layer=24, n_head=14, n_head_kv=2, head_dim=64, n_embd=896, n_ff=4864, n_vocab=151936)
QWEN_QUICK = dict(n_layer=4, n_head=14, n_head_kv=2, head_dim=64, n_embd=896, n_ff=1024, n_vocab=2048)


def make_models(where: Path, quick: bool) -> dict[str, Path]:
    from tiny_gguf import write_tiny_llama_gguf

    where.mkdir(parents=True, exist_ok=True)
    shape = QWEN_QUICK if quick else QWEN_SHAPE
    return {
        "tiny": write_tiny_llama_gguf(where / "tiny.gguf", head_dim=64, n_layer=2, seed=1),
        "qwen-shaped": write_tiny_llama_gguf(
            where / "qwen-shaped.gguf", **shape, dtype="f16", seed=2, rope_theta=1e6, n_ctx_train=32768
        ),
    }


def _max_diff(a, b):
    import numpy as np

    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    excess = np.abs(a - b) - (1e-3 * np.abs(b) + 1e-5)  # > 0 where allclose(rtol=1e-3, atol=1e-5) fails
    return float(np.abs(a - b).max()), bool((excess <= 0).all())


def evidence_check(path: Path) -> list[dict]:
    """Event vs side branch, per (flash attention, K type): max |difference| and pass/fail."""
    import numpy as np

    from amslocal.backend import ContextParams, Model, SamplerParams
    from amslocal.engine import Generator

    model = Model(path)
    rng = np.random.default_rng(0)
    tokens = [int(t) for t in rng.integers(3, 300, 200)]
    rows = []
    for fa in ("on", "off"):
        for kv in ("f16", "q8_0"):
            gens = {}
            for mode in ("step", "event"):
                g = Generator(
                    model,
                    ContextParams(n_ctx=512, flash_attn=fa, type_k=kv, type_v=kv if fa == "on" else "f16"),
                    SamplerParams(temp=0),
                )
                g.view.set_evidence_mode(mode)
                g.view.observe(8, attn=True)
                g.eval(tokens[:120])
                g.view.observe(1, attn=True)
                for t in tokens[120:150]:
                    g.eval([t])
                g.evict([p for p in range(4, 100) if p % 3 == 0])
                for t in tokens[150:200]:
                    g.eval([t])
                gens[mode] = g
            worst, ok = 0.0, True
            s, e = gens["step"].view, gens["event"].view
            for il in s.kv_layers:
                cells, _ = s.occupied()
                for a, b in (
                    (e.evidence[il][:, cells], s.evidence[il][:, cells]),
                    (e.evidence_total[il][:, cells], s.evidence_total[il][:, cells]),
                    (e.last_attn(il)[:, cells], s.last_attn(il)[:, cells]),
                ):
                    d, good = _max_diff(a, b)
                    worst, ok = max(worst, d), ok and good
            rows.append({"flash_attn": fa, "type_k": kv, "max_abs_diff": worst, "pass": ok})
            for g in gens.values():
                g.ctx.close()
    model.close()
    return rows


def run_pytest(log: Path, quick: bool) -> dict:
    t0 = time.perf_counter()
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider"]
    if quick:  # the suite's own run of this script: the kernel and tiny-model cases only
        cmd += ["tests/test_event_evidence.py", "-k", "kernel or tiny or groups"]
    else:
        cmd += [
            "tests/test_event_evidence.py",
            "tests/test_evidence.py",
            "tests/test_row_sets.py",
            "tests/test_move_cells.py",
            "tests/test_kv_reads.py",
        ]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    log.write_text(r.stdout + r.stderr)
    tail = (r.stdout.strip().splitlines() or ["(no output)"])[-1]
    return {
        "command": " ".join(cmd[2:]),
        "returncode": r.returncode,
        "summary": tail,
        "seconds": round(time.perf_counter() - t0, 1),
    }


def speed(path: Path, quick: bool) -> dict:
    from amslocal.bench.speed import run_speed

    return run_speed(
        path,
        depths=(256, 512) if quick else (512, 4096),
        budget=256,
        interval=128,
        n_gen=32 if quick else 128,
        rounds=1 if quick else 2,
        methods=["streaming", "tova", "ams-tova"],
        evidence=("event", "step"),
        include_stock=False,
        progress=lambda m: print(f"device-check: {m}", file=sys.stderr),
    )


def gpu_name() -> str:
    try:
        r = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,driver_version,compute_cap", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=20,
        )
        return r.stdout.strip() or "none"
    except (OSError, subprocess.SubprocessError):
        return "none (nvidia-smi not found)"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backend", choices=["cuda", "cpu"], required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    say = lambda m: print(f"device-check: {m}", file=sys.stderr)  # noqa: E731

    say("making the random-weight models ...")
    models = make_models(
        out / "models" if args.quick else Path(os.environ.get("TMPDIR", "/tmp")) / "amslocal-devcheck", args.quick
    )
    say("evidence: event vs side branch ...")
    evidence = evidence_check(models["qwen-shaped"])
    say("pytest (tiny-model cases) ...")
    tests = run_pytest(out / "pytest.log", args.quick)
    say("speed ...")
    sp = speed(models["qwen-shaped"], args.quick)

    from amslocal.bench.speed import format_table

    build = (out / "build.txt").read_text().strip() if (out / "build.txt").exists() else "build_seconds=?"
    ok = all(r["pass"] for r in evidence) and tests["returncode"] == 0
    result = {
        "backend": args.backend,
        "quick": args.quick,
        "gpu": gpu_name(),
        "python": platform.python_version(),
        "build": build,
        "evidence": evidence,
        "pytest": tests,
        "speed": sp,
        "pass": ok,
        "seconds": round(time.perf_counter() - t0, 1),
        "n_gpu_layers": os.environ.get("AMSLOCAL_N_GPU_LAYERS", "0"),
    }
    (out / "device-check.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [
        f"# amslocal device check ({args.backend}{', quick' if args.quick else ''})",
        "",
        f"- GPU: {result['gpu']}",
        f"- CPU: {sp['cpu']}",
        f"- {build}; checks and speed {result['seconds']} s",
        f"- offloaded layers: {result['n_gpu_layers']} (-1 = all)",
        "",
        "## Evidence at the event vs the per-step side branch (Qwen-shaped random model)",
        "",
        "| flash attention | K type | max abs difference | within rtol 1e-3, atol 1e-5 |",
        "|---|---|---:|---|",
    ]
    lines += [
        f"| {r['flash_attn']} | {r['type_k']} | {r['max_abs_diff']:.2e} | {'yes' if r['pass'] else 'NO'} |"
        for r in evidence
    ]
    lines += [
        "",
        "## Tests on this backend",
        "",
        f"`{tests['command']}`: {tests['summary']} (exit {tests['returncode']}, {tests['seconds']} s; log: pytest.log)",
        "",
        "## Decode speed (Qwen-shaped random model)",
        "",
        format_table(sp),
        "",
        f"**{'PASS' if ok else 'FAIL'}**",
    ]
    (out / "device-check.md").write_text("\n".join(lines) + "\n")
    say(f"{'PASS' if ok else 'FAIL'}: {out / 'device-check.md'}")
    print("\n".join(lines))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
