"""The CUDA targets attnkit is built for, decided in one place: setup.py builds with them and
scripts/setup.sh (run.sh and test.sh) records them in the build stamp, so both README commands
compute the same build configuration and the second reuses the first's build.

    ATTNKIT_CUDA_ARCHS set   that list, as given (";" or "," separated, torch's TORCH_CUDA_ARCH_LIST
                             syntax: "9.0a", "8.0+PTX", ...)
    a visible GPU            its architecture: 9.0 -> "9.0a" (the Hopper kernels need the "a"
                             features), others their own ("8.0", "8.6", "10.0", "12.0"; a GPU newer
                             than this nvcc knows -> the newest target nvcc and torch know below it)
    no GPU (CI)              "9.0a"
plus, unless the list already has some, PTX a newer GPU can JIT: "+PTX" on the highest plain target,
or "8.0+PTX" when every target is an "a" one (sm_90a PTX does not run on sm_100: "a" features are
not forward compatible). So the default without a GPU is "9.0a;8.0+PTX": a Blackwell GPU runs the
compute_80 PTX, and the launchers pick the sm80 (mma.sync) kernels there, since they pick the
Hopper-only ones on a 9.0 device only.

    python3 scripts/cuda_archs.py            prints the targets
    python3 scripts/cuda_archs.py --config   prints setup.sh's build-stamp line
"""
import os
import re
import shutil
import subprocess
import sys

CI_TARGET = "9.0a"      # the GPU machines' (H100 / H200) target, compiled in CI without a GPU
PORTABLE_PTX = "8.0"    # the sm80 path: the oldest architecture with the mma.sync kernels
# Plain targets torch's build helper accepts (torch.utils.cpp_extension._get_cuda_arch_flags).
_TORCH_PLAIN = ["7.5", "8.0", "8.6", "8.7", "8.9", "9.0", "10.0", "10.3", "11.0", "12.0", "12.1"]


def _split(archs):
    return [a.strip() for a in archs.replace(",", ";").split(";") if a.strip()]


def _key(arch):
    major, minor = arch.split("+")[0].rstrip("a").split(".")
    return int(major), int(minor)


def _nvcc_targets():
    """compute_XY targets this nvcc can build, as "X.Y" (empty when nvcc is not found)."""
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    nvcc = os.path.join(home, "bin", "nvcc") if home else (shutil.which("nvcc") or "/usr/local/cuda/bin/nvcc")
    try:
        out = subprocess.run([nvcc, "--list-gpu-arch"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return []
    return [f"{int(n) // 10}.{int(n) % 10}" for n in re.findall(r"compute_(\d+)\b", out)]


def native_target(capability):
    """The target for a device of this compute capability (major, minor), or None."""
    major, minor = capability
    if major == 9:
        return "9.0a"
    own = f"{major}.{minor}"
    if capability < (9, 0):
        return own if own in _TORCH_PLAIN else None
    # Newer than Hopper: its own architecture when this nvcc and torch know it, else the newest
    # one below it they both know (its PTX, added below, then runs on the device).
    known = [a for a in _TORCH_PLAIN if a in set(_nvcc_targets()) and _key(a) <= capability]
    return max(known, key=_key) if known else None


def with_ptx(targets):
    if any(t.endswith("+PTX") for t in targets):
        return targets
    plain = [t for t in targets if not t.endswith("a")]
    if plain:
        top = max(plain, key=_key)
        return [t + "+PTX" if t == top else t for t in targets]
    return targets + [PORTABLE_PTX + "+PTX"]


def default_archs():
    import torch

    targets = []
    if torch.version.cuda is not None and torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            t = native_target(torch.cuda.get_device_capability(i))
            if t is not None and t not in targets:
                targets.append(t)
    if not targets:
        targets = [CI_TARGET]
    return ";".join(with_ptx(sorted(targets, key=_key, reverse=True)))


def cuda_archs():
    """ATTNKIT_CUDA_ARCHS when set, else default_archs(); ";"-separated."""
    given = os.environ.get("ATTNKIT_CUDA_ARCHS", "").strip()
    return ";".join(_split(given)) if given else default_archs()


def has_sm90a(archs):
    """Whether the list builds sm_90a code (setup.py then defines ATTNKIT_SM90A_TARGET)."""
    return any(a.split("+")[0] == "9.0a" for a in _split(archs))


if __name__ == "__main__":
    if sys.argv[1:] == ["--config"]:
        import torch

        cpu_only = os.environ.get("ATTNKIT_CPU_ONLY", "0") == "1"
        if torch.version.hip is not None:  # setup.py: ROCm builds go through hipify (docs/rocm.md)
            archs = "rocm:" + os.environ.get("PYTORCH_ROCM_ARCH", os.environ.get("ATTNKIT_ROCM_ARCHS", "gfx90a;gfx942"))
        else:
            archs = "none" if cpu_only or torch.version.cuda is None else cuda_archs()
        print(f"archs={archs} cpu_only={int(cpu_only)} torch={torch.__version__}")
    else:
        print(cuda_archs())
