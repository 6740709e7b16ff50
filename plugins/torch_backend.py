"""Built-in plugin: the `torch` backend (native PyTorch, safetensors weights).

Weights are read with safetensors (nothing is unpickled) into the networks that the bundle's
metadata describes (`wbc_batch.nets`). Inference runs under `torch.inference_mode()`. torch is
imported only when the backend is asked about its availability or opened.
"""

from __future__ import annotations

import importlib

from wbc_batch.backend import BackendError
from wbc_batch.devices import DeviceError, resolve_device
from wbc_batch.hookspecs import hookimpl


class TorchBackend:
    """Runs the bundle's `segmenter.safetensors` and `classifier.safetensors` with PyTorch."""

    name = "torch"

    def availability(self) -> tuple:
        try:
            import torch
        except Exception as exc:  # noqa: BLE001 - must not raise
            return False, f"torch cannot be imported: {exc}"
        from wbc_batch.nets import torch_cuda_devices

        count, why_none = torch_cuda_devices()
        if count:
            names = ", ".join(torch.cuda.get_device_name(i) for i in range(count))
            return True, f"CUDA: {names}"
        return True, f"CPU only ({why_none or 'no CUDA device'})"

    def open(self, bundle, device: str = "auto", threads: int = 0):
        """Load both networks on `device`; `threads` > 0 sets torch's CPU threads."""
        try:  # nets imports it: here, to say so clearly where it is missing or broken
            importlib.import_module("torch")
        except Exception as exc:  # noqa: BLE001
            raise BackendError(f"the torch backend needs PyTorch, which cannot be imported: {exc}") from exc
        from wbc_batch.bundle import BundleError
        from wbc_batch.nets import (TorchSession, claim_threads, release_threads,
                                    torch_cuda_devices)

        try:
            resolved, note = resolve_device(device, *torch_cuda_devices())
        except DeviceError as exc:
            raise BackendError(str(exc)) from exc
        # the process's count: given back when the last session that set it closes
        claimed = claim_threads(threads)
        try:
            try:
                session = TorchSession.from_bundle(bundle, resolved, note)
            except BaseException:
                if claimed:
                    release_threads()
                raise
            session.threads_claimed = claimed
            return session
        except (BundleError, ValueError, OSError) as exc:
            raise BackendError(str(exc)) from exc
        except (TypeError, KeyError, IndexError) as exc:  # bundle.json's arch unlike its weights
            raise BackendError(f"the model in {bundle.root} cannot be built: "
                               f"{type(exc).__name__}: {exc}") from exc
        except RuntimeError as exc:  # e.g. CUDA out of memory while moving the weights
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise BackendError(f"cannot load the models on {resolved}: {first}") from exc


@hookimpl
def wbc_register_backends():
    return [TorchBackend()]
