"""Quantization error of the inverse 4th root (the experiment of the 4-bit Shampoo paper, Wang et al.,
NeurIPS 2024, that compares quantizing the preconditioner with quantizing its eigenvectors): quantizing the preconditioner A
itself against quantizing its eigenvectors U, with and without Björck rectification, for the
Linear-2 and dynamic-tree codebooks at 4 and 8 bits.

Matrices
--------
``synthetic``  a reproducible stand-in for the paper's A2: order 1200, U from the QR of a
               seeded Gaussian matrix, eigenvalues 1 (600 times) and 1e-3 (600 times).
``lm``         a real preconditioner: the largest left and the largest right Kronecker factor of
               the character-level transformer of ``quality.py`` after training it with 32-bit
               Shampoo (seed 0, lr 2e-3, T1 / T2 = 10 / 50, 400 steps). The factors are stored in
               ``results/lm_preconditioner.npz`` and reused (``--recapture`` retrains). The paper's
               A1 is a Swin-Tiny preconditioner of order 1200, so its column is a reference only.

Rows (f(A) = (A + rho I)^-1/4 with rho = 1e-6 max eig, float64 eigendecompositions)
---------------------------------------------------------------------------------------
``A``                  A stored diag-real (fp32 diagonal, off-diagonal quantized), root of D(Q(A)) with
                       the optimizer's rule (negative eigenvalues clamped to 0, damping 1e-6 max eig).
                       Quantizing A makes it indefinite, and the result depends strongly on that rule:
                       damping 1e-4 / 1e-3 and |eigenvalues| are reported as a sensitivity table.
``U``                  U^T quantized row-wise, V = D(Q(U)), exact root of V diag(lambda) V^T
``U + 1 Björck``       the same with one Björck step on V
``full pipeline``      V with one Björck step, root V diag(lambda^-1/4) V^T, root stored diag-real
                       quantized and dequantized (what the optimizer multiplies the gradient by)
``full, 4 Björck``     the optimizer's PIRU default (t2 = 4 Björck steps) - an extra row
NRE = ||f - f~||_F / ||f||_F; AE = angle between f and f~ as vectors, in degrees. Block 64.
"""

from __future__ import annotations

import math
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS_DIR, base_parser, setup_run, table, write_result

from lightning_shampoo4 import linalg
from lightning_shampoo4.quant import dequantize, dequantize_symmetric, get_codebook, quantize, quantize_symmetric

NAME = "quant_error"
PRECOND_FILE = "lm_preconditioner.npz"
EPS = 1e-6
BLOCK = 64

# the paper's figures: (codebook, bits, row) -> (A1 NRE, A1 AE, A2 NRE, A2 AE)
PAPER = {
    ("dynamic", 8, "A"): (0.2192, 8.30, 0.1896, 10.88),
    ("dynamic", 4, "A"): (0.6241, 17.32, 0.4615, 17.19),
    ("dynamic", 4, "U"): (0.0709, 4.04, 0.1224, 7.01),
    ("dynamic", 4, "U+1"): (0.0455, 2.56, 0.0878, 5.00),
    ("linear2", 8, "A"): (0.2164, 7.98, 0.1310, 7.47),
    ("linear2", 4, "A"): (0.6243, 17.29, 0.4465, 15.34),
    ("linear2", 4, "U"): (0.0543, 3.11, 0.0942, 5.40),
    ("linear2", 4, "U+1"): (0.0343, 1.95, 0.0669, 3.82),
    ("linear2", 4, "full"): (0.0466, 2.65, 0.0941, 5.37),
}
# reference figures of the stand-in (Linear-2, 4 bit): NRE quantizing A / U / U + 1 Björck.
STANDIN_REF = {"A": 0.55, "U": 0.092, "U+1": 0.063}
ORTHO_REF = [5.3, 0.84, 0.03, 5e-5]
ROW_NAMES = {
    "A": "A",
    "U": "U",
    "U+1": "U + 1 Björck",
    "full": "U then root, + Björck (full pipeline)",
    "full4": "full pipeline, 4 Björck steps (the paper's root update)",
    "stored": "as stored by default: U with bf16 scales, 4 Björck, root triangle (block 256, bf16 scales)",
}
# (codebook, bits, rows): the paper's table first, then extra rows.
CASES = [
    ("dynamic", 8, ("A",)),
    ("dynamic", 4, ("A", "U", "U+1", "full")),
    ("linear2", 8, ("A", "U", "U+1", "full")),
    ("linear2", 4, ("A", "U", "U+1", "full", "full4", "stored")),
    ("linear", 4, ("A", "U", "U+1", "full")),
]


def stand_in(n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    lam = torch.cat([torch.ones(n // 2, dtype=torch.float64), torch.full((n - n // 2,), 1e-3, dtype=torch.float64)])
    return u, lam


def root_from_eig(lam: torch.Tensor, v: torch.Tensor, eps: float = EPS) -> torch.Tensor:
    lam = lam.clamp(min=0)
    return (v * (lam + eps * lam.max()) ** -0.25) @ v.mT


def exact_root(a: torch.Tensor, eps: float = EPS) -> torch.Tensor:
    lam, v = torch.linalg.eigh((a + a.mT) / 2)
    return root_from_eig(lam, v, eps)


def nre(x: torch.Tensor, f: torch.Tensor) -> float:
    return float((x - f).norm() / f.norm())


def angle(x: torch.Tensor, f: torch.Tensor) -> float:
    cos = float((x * f).sum() / (x.norm() * f.norm()))
    return math.degrees(math.acos(max(-1.0, min(1.0, cos))))


def qd(x: torch.Tensor, codebook: str, bits: int, **kw: bool) -> torch.Tensor:
    """Quantize then dequantize (fp32 storage, as the optimizer does), back to float64."""
    cb = get_codebook(codebook, bits)
    q = quantize(x.float(), cb, bits, BLOCK, **kw)
    return dequantize(q, cb, x.shape, bits, BLOCK, transpose=kw.get("transpose", False)).double()


def errors(a: torch.Tensor, lam: torch.Tensor, u: torch.Tensor, cases=CASES) -> dict[str, dict[str, float]]:
    """NRE / AE of every (codebook, bits, row) for A = U diag(lam) U^T (all float64)."""
    f = root_from_eig(lam, u)
    out: dict[str, dict[str, float]] = {}
    for codebook, bits, rows in cases:
        vq = qd(u, codebook, bits, transpose=True) if any(r != "A" for r in rows) else None
        for row in rows:
            if row == "A":
                aq = qd(a, codebook, bits, offdiag=True)
                w, v = torch.linalg.eigh((aq + aq.mT) / 2)
                approx = root_from_eig(w, v)
                # How the root treats the negative eigenvalues that quantizing A creates decides
                # the size of this error; a few alternatives to the optimizer's rule.
                sens = {"min_eig_of_quantized": float(w.min())}
                for label, eps in (("damping_1e-4", 1e-4), ("damping_1e-3", 1e-3)):
                    x = root_from_eig(w, v, eps)
                    sens[label] = {"nre": nre(x, f), "ae": angle(x, f)}
                x = (v * (w.abs() + EPS * w.abs().max()) ** -0.25) @ v.mT
                sens["abs_eigenvalues"] = {"nre": nre(x, f), "ae": angle(x, f)}
            elif row in ("U", "U+1"):
                v = linalg.bjorck(vq, 0 if row == "U" else 1)
                approx = exact_root((v * lam) @ v.mT)
            elif row == "stored":
                cb = get_codebook(codebook, bits)
                q = quantize(u.float(), cb, bits, BLOCK, transpose=True, scale_dtype=torch.bfloat16)
                v = linalg.bjorck(dequantize(q, cb, u.shape, bits, BLOCK, transpose=True).double(), 4)
                r = quantize_symmetric(root_from_eig(lam, v).float(), cb, bits, 256, scale_dtype=torch.bfloat16)
                approx = dequantize_symmetric(r, cb, u.shape[0], bits, 256).double()
            else:
                v = linalg.bjorck(vq, 1 if row == "full" else 4)
                approx = qd(root_from_eig(lam, v), codebook, bits, offdiag=True)
            out[f"{codebook}/{bits}/{row}"] = {"nre": nre(approx, f), "ae": angle(approx, f)}
            if row == "A":
                out[f"{codebook}/{bits}/{row}"]["sensitivity"] = sens
    return out


def orthogonality(u: torch.Tensor, codebook: str = "linear2", bits: int = 4) -> list[float]:
    """||V^T V - I||_F of the dequantized U after 0..3 Björck steps (fp32, as in the optimizer)."""
    v = qd(u, codebook, bits, transpose=True).float()
    return [linalg.orthogonality_error(linalg.bjorck(v, k)) for k in range(4)]


# -- the real preconditioner from the character-level LM -----------------------------------
def capture_lm_preconditioner(steps: int, quick: bool) -> dict[str, np.ndarray]:
    """Train the char-LM with 32-bit Shampoo and return its largest left and right factors."""
    import quality

    cfg = dict(quality.QUICK["charlm"] if quick else quality.FULL["charlm"])
    cfg.update(steps=steps, eval_every=10**9)
    data, _ = quality.load_char_data(cfg["chars"])
    captured: dict[str, Any] = {}
    real_make = quality.make_optimizer

    def make_and_keep(name, model, task, lr, c):
        opt = real_make(name, model, task, lr, c)
        captured["opt"], captured["model"] = opt, model
        return opt

    quality.make_optimizer = make_and_keep
    try:
        quality.train_run("charlm", "shampoo32", 2e-3, 0, data, cfg)
    finally:
        quality.make_optimizer = real_make
    opt, model = captured["opt"], captured["model"]
    names = {p: n for n, p in model.named_parameters()}
    out: dict[str, np.ndarray] = {}
    for side in ("L", "R"):
        p, i, _, factor = max(((p, i, s, f) for p, i, s, f in opt.factors() if s == side), key=lambda t: t[3].order)
        out[f"{side}_factor"] = factor.factor().double().numpy()
        out[f"{side}_name"] = np.array(f"{names[p]} block {i} {'left' if side == 'L' else 'right'}")
    out["steps"] = np.array(steps)
    return out


def load_or_capture(path: Path, steps: int, recapture: bool, quick: bool) -> tuple[dict[str, np.ndarray], bool]:
    if path.exists() and not recapture:
        with np.load(path) as z:
            return {k: z[k] for k in z.files}, False
    mats = capture_lm_preconditioner(steps, quick)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(path, **{k: (v.astype(np.float32) if v.dtype == np.float64 else v) for k, v in mats.items()})
    return mats, True


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = base_parser(__doc__.split("\n\n")[0], NAME)
    parser.add_argument("--n", type=int, default=None, help="order of the synthetic stand-in (default 1200; 256 with --quick)")
    parser.add_argument("--lm-steps", type=int, default=None, help="training steps before capturing (default 400; 12 with --quick)")
    parser.add_argument("--recapture", action="store_true", help="retrain the char-LM instead of loading the saved factors")
    parser.add_argument(
        "--preconditioner", type=Path, default=None,
        help=f"the saved LM factors (default results/{PRECOND_FILE}; with --quick a fresh capture under --out)",
    )
    parser.add_argument("--no-lm", action="store_true", help="skip the real-preconditioner column")
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(argv)
    run = setup_run(args)
    n = args.n or (256 if args.quick else 1200)
    lm_steps = args.lm_steps or (12 if args.quick else 400)

    t0 = time.perf_counter()
    u, lam = stand_in(n)
    a = (u * lam) @ u.T
    synth = errors(a, lam, u)
    ortho = orthogonality(u)
    print(f"[quant_error] synthetic n={n} in {time.perf_counter() - t0:.1f}s", flush=True)

    lm: dict[str, Any] = {}
    if not args.no_lm:
        t0 = time.perf_counter()
        path = args.preconditioner or (args.out / PRECOND_FILE if args.quick else RESULTS_DIR / PRECOND_FILE)
        mats, fresh = load_or_capture(path, lm_steps, args.recapture or args.quick, args.quick)
        lm = {"file": path.name, "captured_now": fresh, "steps": int(mats["steps"]), "factors": {}}
        for side in ("L", "R"):
            fa = torch.from_numpy(mats[f"{side}_factor"]).double()
            fa = (fa + fa.T) / 2
            w, v = torch.linalg.eigh(fa)
            rec = {
                "name": str(mats[f"{side}_name"]),
                "order": fa.shape[0],
                "eig_max": float(w.max()),
                "eig_min": float(w.min()),
                "cond_damped": float((w.max() * (1 + EPS)) / (w.clamp(min=0).min() + EPS * w.max())),
                "errors": errors(fa, w, v),
                "orthogonality": orthogonality(v),
            }
            lm["factors"][side] = rec
        print(f"[quant_error] LM preconditioner in {time.perf_counter() - t0:.1f}s", flush=True)

    # -- table --
    headers = ["map", "bits", "quantized", f"stand-in n={n} NRE / AE", "paper A2 NRE / AE"]
    if lm:
        for side, rec in lm["factors"].items():
            headers.append(f"LM {side} n={rec['order']} NRE / AE")
    headers.append("paper A1 (Swin-T) NRE / AE")
    rows = []
    cb_name = {"dynamic": "DT", "linear2": "Linear-2", "linear": "Linear"}
    for codebook, bits, row_keys in CASES:
        for row in row_keys:
            key = f"{codebook}/{bits}/{row}"
            spec = PAPER.get((codebook, bits, row))
            cells = [cb_name[codebook], bits, ROW_NAMES[row] + ("" if spec else " *"),
                     f"{synth[key]['nre']:.4f} / {synth[key]['ae']:.2f}",
                     f"{spec[2]:.4f} / {spec[3]:.2f}" if spec else "-"]
            for rec in lm.get("factors", {}).values():
                e = rec["errors"][key]
                cells.append(f"{e['nre']:.4f} / {e['ae']:.2f}")
            cells.append(f"{spec[0]:.4f} / {spec[1]:.2f}" if spec else "-")
            rows.append(cells)
    print("\nNRE / angle (degrees) of the inverse 4th root; * = not in the paper's table")
    print(table(headers, rows))
    srows = []
    for codebook, bits, row_keys in CASES:
        if "A" not in row_keys:
            continue
        key = f"{codebook}/{bits}/A"
        mats = [("stand-in", synth)] + [(f"LM {side}", rec["errors"]) for side, rec in lm.get("factors", {}).items()]
        for label, errs in mats:
            e = errs[key]
            sv = e["sensitivity"]
            srows.append([cb_name[codebook], bits, label, f"{sv['min_eig_of_quantized']:.3g}", f"{e['nre']:.4f}",
                          f"{sv['damping_1e-4']['nre']:.4f}", f"{sv['damping_1e-3']['nre']:.4f}",
                          f"{sv['abs_eigenvalues']['nre']:.4f}"])
    print("\nQuantizing A: NRE of the root under different treatments of the quantized A's small / negative eigenvalues")
    print(table(["map", "bits", "matrix", "min eig of D(Q(A))", "clamp, 1e-6 (main)", "damping 1e-4", "damping 1e-3",
                 "|eigenvalues|"], srows))
    print("\nOrthogonality ||V^T V - I||_F of 4-bit Linear-2 U after k Björck steps")
    orows = [["stand-in", n] + [f"{x:.3g}" for x in ortho], ["reference (n=1200)", 1200] + [f"{x:.3g}" for x in ORTHO_REF]]
    for side, rec in lm.get("factors", {}).items():
        orows.append([f"LM {side}", rec["order"]] + [f"{x:.3g}" for x in rec["orthogonality"]])
    print(table(["matrix", "n", "k=0", "k=1", "k=2", "k=3"], orows))

    payload = {
        "settings": {"block_size": BLOCK, "eps": EPS, "n": n, "root": "float64 eigh, relative damping eps * max eig",
                     "storage": "quantize in fp32 as the optimizer does; error arithmetic in float64"},
        "spec": {f"{c}/{b}/{r}": dict(zip(("A1_nre", "A1_ae", "A2_nre", "A2_ae"), v)) for (c, b, r), v in PAPER.items()},
        "spec_stand_in": STANDIN_REF,
        "spec_orthogonality": ORTHO_REF,
        "rows": {k: ROW_NAMES[k] for k in ROW_NAMES},
        "synthetic": {"errors": synth, "orthogonality": ortho},
        "lm": lm,
    }
    path = write_result(args.out, NAME, payload, run, argv)
    print(f"\nwrote {path}")
    return payload


if __name__ == "__main__":
    main()
