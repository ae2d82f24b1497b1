# Sourced by the GPU-lease scripts (jobs/gpu-lease.sh, jobs/gpu-train.sh); needs $py.
# lease_environment FILE: the GPU, driver, torch and which of raysegment's dependencies are missing there.
lease_environment() {
    { nvidia-smi; "$py" -c 'import sys, torch, numpy
print("python", sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda, "numpy", numpy.__version__)
print("gpu", torch.cuda.get_device_name(0) if torch.cuda.is_available() else None)
import importlib.util as u
print("missing:", [m for m in ("ray", "mlflow", "optuna", "nibabel", "highdicom", "safetensors", "h5py", "pyarrow", "scipy")
                   if u.find_spec(m) is None])'; nproc; } > "$1" 2>&1
    tail -3 "$1"
}
