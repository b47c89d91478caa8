"""What every benchmark does with its result: print it as JSON and, if asked, write it to a file."""

import json
import platform

import torch


def device_name(device):
    """The accelerator's name, or the CPU with its thread count."""
    return torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu x{torch.get_num_threads()} threads"


def machine():
    return platform.processor() or platform.machine()


def report(result, path=None):
    """Print ``result`` as indented JSON and write it to ``path`` (if given); return it."""
    print(json.dumps(result, indent=2))
    if path:
        with open(path, "w") as f:
            json.dump(result, f, indent=2)
    return result
