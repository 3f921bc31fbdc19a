#!/usr/bin/env bash
# Wheels of the packages that meloformer needs and that the GPU machine lacks (it has no network), for Python 3.12 on
# manylinux x86-64, into .whl/ at the repository root (ignored by git; `bench/gpu_device.sh` installs them there).
#
#     bash bench/fetch_wheels.sh            # downloads, then lists each wheel's Requires-Dist and the total size
#
# The list: settings.ini's `requirements` less what the GPU image already holds (torch, numpy, pandas, matplotlib,
# tqdm, safetensors, huggingface_hub, pyyaml, packaging, typing-extensions), and the dependencies of these wheels that it
# lacks as well: symusic imports platformdirs and pySmartDL at import time (its soundfont module); jsonargparse's
# `signatures` extra is docstring-parser and typeshed-client. `--no-deps`: nothing else comes along. The versions are
# the ones the tests pass with here; one version of each, or the install there stops.
set -euo pipefail
cd "$(dirname "$0")/.."
WHEELS=(symusic==0.6.0 platformdirs==4.14.9 pySmartDL==1.3.4 miditoolkit==1.0.1 mido==1.3.3 fastcore==1.8.18
        jsonargparse==4.53.0 docstring-parser==0.18.0 typeshed-client==2.15.0)
PLATFORMS=(manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64)
rm -rf .whl && mkdir .whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  "${PLATFORMS[@]/#/--platform=}" -d .whl "${WHEELS[@]}"
echo "== .whl: each wheel and what it requires (the GPU image has every requirement not in .whl)"
for w in .whl/*.whl; do
  reqs=$(unzip -p "$w" '*.dist-info/METADATA' | grep '^Requires-Dist' | grep -v 'extra ==' | sed 's/Requires-Dist: //' | paste -sd, - || true)
  printf '%-60s %6s KiB  requires: %s\n' "$(basename "$w")" "$(( $(stat -c %s "$w") / 1024 ))" "${reqs:-nothing}"
done
n=$(ls .whl/*.whl | wc -l); total=$(du -cb .whl/*.whl | tail -1 | cut -f1)
echo "$n wheels, $(( total / 1024 )) KiB in all"
if [ "$n" -ne "${#WHEELS[@]}" ]; then echo "fetch_wheels.sh: expected ${#WHEELS[@]} wheels, got $n" >&2; exit 1; fi
if [ "$total" -gt $(( 40 * 1024 * 1024 )) ]; then echo "fetch_wheels.sh: over 40 MiB: the working tree that travels is 64 MiB at most" >&2; exit 1; fi
