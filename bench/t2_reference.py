"""T2 side by side: the node's qDESS map against DOSMA's, and the speed of both models at full size.

    python -m bench.t2_reference [--size small|full] [--dosma-python PATH]

1. qDESS phantom echoes (openmsk.phantom.echoes, SNR 40): the node's map (worker.t2.qdess) against DOSMA's
   ``QDess.generate_t2_map`` (PyPI ``dosma``, the ``bench`` extra) on the same echoes and parameters, in the
   femoral cartilage (DOSMA maps one tissue at a time; T1 1200 ms): the difference in ms and the time ratio.
   DOSMA 0.1.2 (the latest release) calls ``np.round_``, which NumPy 2 removed, and the node runs NumPy 2:
   when ``import dosma`` fails here the script says why and runs DOSMA in another interpreter given by
   ``--dosma-python`` (a venv with ``dosma``, ``numpy<2`` and ``pandas<2.3``) on the echoes saved as .npy.
   Without one it compares against a straightforward float64 implementation of the published formula
   (:func:`reference_qdess`), written from the paper's expression, not from the node's code.
2. Speed on one core at 384 x 384 x 160: the 2-echo qDESS map (target <= 2 s) and the 7-echo MESE fit
   (target <= 5 s), on the full-size phantom's echoes.
"""

from __future__ import annotations

import os

for _name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_name, "1")  # one core, as the targets are stated

import argparse  # noqa: E402
import math  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402

from openmsk.labels import TISSUES  # noqa: E402
from openmsk.phantom.echoes import QDESS, generate_echoes  # noqa: E402
from worker.t2.mese import mese_t2  # noqa: E402
from worker.t2.parameters import QdessParameters  # noqa: E402
from worker.t2.qdess import qdess_t2  # noqa: E402
from worker.t2.statistics import T2_TISSUES  # noqa: E402

FEMORAL = next(t.label for t in TISSUES.values() if t.name == "femoral_cartilage")
FEMORAL_T1_MS = 1200.0

_DOSMA_SCRIPT = """
import sys, time, numpy as np
from dosma.core.med_volume import MedicalVolume
from dosma.scan_sequences import QDess
folder, tr, te, alpha, gl, tg, t1 = sys.argv[1], *map(float, sys.argv[2:8])
e1, e2 = (MedicalVolume(np.load(f"{folder}/echo{n}.npy"), np.eye(4)) for n in (1, 2))
scan = QDess([e1, e2])
start = time.perf_counter()
t2 = scan.generate_t2_map(gl_area=gl, tg=tg, tr=tr, te=te, alpha=alpha, t1=t1, decimals=None, nan_to_num=0.0)
seconds = time.perf_counter() - start
np.save(f"{folder}/dosma_t2.npy", np.asarray(t2.volumetric_map.volume, dtype=np.float32))
print(seconds)
"""


def reference_qdess(s1: np.ndarray, s2: np.ndarray, params: QdessParameters, t1_ms: float) -> np.ndarray:
    """Sveinsson's expression evaluated literally in float64 (times in s), T2 kept in (0, 100) ms, else 0."""
    tr, te, tg, t1 = (
        params.repetition_time_ms * 1e-3,
        params.echo_time_ms * 1e-3,
        params.tg_us * 1e-6,
        t1_ms * 1e-3,
    )
    alpha = math.radians(params.flip_angle_deg)
    gl = params.gl_area / (tg * 1e6) * 100
    dkl = 4258 * 2 * math.pi * gl * tg
    e = math.exp(-tr / t1 - tr * dkl**2 * params.diffusivity_m2_s)
    k = math.sin(alpha / 2) ** 2 * (1 + e) / (1 - math.cos(alpha) * e)
    c1 = (tr - tg / 3) * dkl**2 * params.diffusivity_m2_s
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.abs(s2.astype(np.float64) / s1.astype(np.float64))
        t2 = -2000 * (tr - te) / (np.log(ratio / k) + c1)
    return np.where((t2 > 0) & (t2 < 100), t2, 0.0)


def _params() -> QdessParameters:
    return QdessParameters(
        repetition_time_ms=QDESS.repetition_time_ms,
        echo_time_ms=QDESS.echo_time_ms,
        flip_angle_deg=QDESS.flip_angle_deg,
        gl_area=QDESS.gl_area,
        tg_us=QDESS.tg_us,
    )


def _best_of(runs: int, call) -> tuple[float, object]:
    best, result = float("inf"), None
    for _ in range(runs):
        start = time.perf_counter()
        result = call()
        best = min(best, time.perf_counter() - start)
    return best, result


def _dosma_in_process() -> str | None:
    """None when DOSMA imports here, else why not (one line)."""
    try:
        import dosma  # noqa: F401
    except Exception as exc:  # any import failure is the answer: missing, or broken under NumPy 2
        return f"{type(exc).__name__}: {exc}".splitlines()[0]
    return None


def _run_dosma(
    s1: np.ndarray, s2: np.ndarray, params: QdessParameters, python: str
) -> tuple[np.ndarray, float]:
    with tempfile.TemporaryDirectory(prefix="t2-dosma-") as tmp:
        np.save(f"{tmp}/echo1.npy", s1)
        np.save(f"{tmp}/echo2.npy", s2)
        args = [
            params.repetition_time_ms,
            params.echo_time_ms,
            params.flip_angle_deg,
            params.gl_area,
            params.tg_us,
            FEMORAL_T1_MS,
        ]
        done = subprocess.run(
            [python, "-c", _DOSMA_SCRIPT, tmp, *map(str, args)],
            capture_output=True,
            text=True,
            timeout=600,
            env={**os.environ, "OMP_NUM_THREADS": "1"},
        )
        if done.returncode != 0:
            raise RuntimeError(done.stderr.strip().splitlines()[-1] if done.stderr.strip() else "failed")
        return np.load(f"{tmp}/dosma_t2.npy"), float(done.stdout.strip().splitlines()[-1])


def compare(size: str, dosma_python: str | None) -> None:
    phantom = generate_echoes("qdess", seed=7, size=size, snr=40.0)
    s1, s2 = phantom.echoes
    labels = phantom.base.labels
    params = _params()
    femoral = labels == FEMORAL
    node_s, node = _best_of(3, lambda: qdess_t2(s1, s2, params, labels=labels, t1_by_label={FEMORAL: 1200.0}))
    assert isinstance(node, np.ndarray)
    print(f"qDESS phantom {size} {s1.shape}, SNR 40, femoral cartilage {int(femoral.sum())} voxels")
    print(f"  node map: {node_s:.3f} s; femoral cartilage T2 mean {node[femoral & (node > 0)].mean():.2f} ms "
          f"(truth {phantom.t2_truth_ms['femoral_cartilage']:.1f})")  # fmt: skip
    why = _dosma_in_process()
    reference = None
    if why is None:
        from dosma.core.med_volume import MedicalVolume
        from dosma.scan_sequences import QDess

        scan = QDess([MedicalVolume(s1, np.eye(4)), MedicalVolume(s2, np.eye(4))])
        args = {"gl_area": params.gl_area, "tg": params.tg_us, "tr": params.repetition_time_ms}
        args |= {"te": params.echo_time_ms, "alpha": params.flip_angle_deg, "t1": FEMORAL_T1_MS}
        ref_s, qv = _best_of(1, lambda: scan.generate_t2_map(**args, decimals=None, nan_to_num=0.0))
        reference, name = np.asarray(qv.volumetric_map.volume, np.float32), "DOSMA (in process)"
    else:
        print(f"  DOSMA cannot run in this interpreter: {why}")
        if dosma_python:
            try:
                reference, ref_s = _run_dosma(s1, s2, params, dosma_python)
                name = f"DOSMA via {dosma_python}"
            except (RuntimeError, OSError, subprocess.TimeoutExpired) as exc:
                print(f"  DOSMA in {dosma_python} failed too: {exc}")
        else:
            print("  (give --dosma-python PATH: an interpreter with dosma, numpy<2 and pandas<2.3)")
    if reference is None:
        ref_s, ref = _best_of(3, lambda: reference_qdess(s1, s2, params, FEMORAL_T1_MS))
        reference, name = np.asarray(ref, np.float32), "reference formula (float64, numpy)"
    both = femoral & (node > 0) & (reference > 0)
    diff = node[both] - reference[both]
    print(f"  {name}: {ref_s:.3f} s")
    print(f"  femoral cartilage, node - {name.split(' (')[0]}: mean {diff.mean():+.2e} ms, max |d| "
          f"{np.abs(diff).max():.2e} ms over {int(both.sum())} voxels; same voxels kept: "
          f"{int((femoral & ((node > 0) != (reference > 0))).sum())} differ")  # fmt: skip
    print(f"  time ratio node / {name.split(' (')[0]}: {node_s / ref_s:.2f}")


def speed() -> None:
    for kind, target in (("qdess", 2.0), ("mese", 5.0)):
        phantom = generate_echoes(kind, seed=7, size="full", snr=40.0)
        echoes = phantom.echoes
        if kind == "qdess":
            labels = phantom.base.labels
            seconds, _ = _best_of(
                3,
                lambda e=echoes, lab=labels: qdess_t2(
                    e[0], e[1], _params(), labels=lab, t1_by_label={FEMORAL: 1200.0}
                ),
            )
        else:
            # As the pipeline fits it: in the segmented cartilage and menisci (here the phantom's labels).
            mask = np.isin(phantom.base.labels, T2_TISSUES)
            seconds, _ = _best_of(3, lambda e=echoes, t=phantom.echo_times_ms, m=mask: mese_t2(e, t, mask=m))
            print(f"mese fit over {int(mask.sum())} voxels (cartilage and menisci)")
        verdict = "meets" if seconds <= target else "MISSES"
        print(f"{kind} {echoes.shape[1:]} x {echoes.shape[0]} echoes on one core: {seconds:.2f} s "
              f"({verdict} the {target:.0f} s target)")  # fmt: skip
        del phantom, echoes


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--size", choices=("small", "full"), default="small", help="phantom for the comparison"
    )
    parser.add_argument(
        "--dosma-python", help="an interpreter with dosma (needs numpy<2), when this one has none"
    )
    parser.add_argument("--no-speed", action="store_true", help="skip the full-size timing")
    args = parser.parse_args(argv)
    compare(args.size, args.dosma_python)
    if not args.no_speed:
        speed()
    return 0


if __name__ == "__main__":
    sys.exit(main())
