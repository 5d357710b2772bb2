# Shared by the GPU scripts (sourced): parse --smoke, bring the shared CIFAR-10 copy into the ignored
# data/ folder so that it travels with the working tree, and install isif if it is missing.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
SMOKE=0
[[ "${1:-}" == "--smoke" ]] && SMOKE=1
DATA=data/cifar10-jpeg.zip
if [[ ! -f "$DATA" && -f ../shared/datasets/cifar10-jpeg.zip ]]; then
  mkdir -p data && cp ../shared/datasets/cifar10-jpeg.zip "$DATA"   # data/ is ignored by git
fi
python -c "import isif" 2>/dev/null || python -m pip install -q -e .
OUT=${OUT:-runs}
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
