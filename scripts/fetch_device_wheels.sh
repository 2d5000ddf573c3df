#!/usr/bin/env bash
# Downloads (here, where pip reaches PyPI) the wheels that scripts/gpu_check.sh installs on a GPU machine that
# has jax/flax/torch/transformers but not our data stack (configs import the data pipeline), and optax as pinned
# in requirements.txt (a pure-Python wheel; the machine's own may be another version).
# Python 3.12 x86-64 wheels into .whl/ (git-ignored); carry the folder with the device call.
set -euo pipefail
cd "$(dirname "$0")/.."
PACKAGES=(array-record==0.8.6 cffi==2.1.1 grain==0.2.18 ml-collections==1.1.0 optax==0.2.8 portpicker==1.6.0
          pycparser==3.12 soundfile==0.14.0 soxr==1.1.0)
# Only these versions: a wheel left from an earlier pin would make gpu_check.sh's pip install two versions of one
# package, which it refuses (ResolutionImpossible), installing nothing.
rm -rf .whl
mkdir -p .whl
for package in "${PACKAGES[@]}"; do
    python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
        --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
        -d .whl "$package"
done
ls .whl
