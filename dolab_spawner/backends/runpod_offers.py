"""What a RunPod profile asks for, and what RunPod offers for it: the pod request of a selection, the GPU types to
try within the price cap, and the form's prices. Pure: the RunPod backend makes the calls.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from dolab_core.engines.runpod import GpuType

from ..options import Selection

__all__ = ["CLOUDS", "cloud_word", "offers_within_cap", "pod_request", "price_rows"]

#: A profile's ``cloud_type`` -> RunPod's clouds to try, in order.
CLOUDS = {"secure": ("SECURE",), "community": ("COMMUNITY",), "all": ("SECURE", "COMMUNITY")}


def cloud_word(cloud: str) -> str:
    """How a RunPod cloud is named in sentences (``secure``, ``community``)."""
    return cloud.lower()


def pod_request(selection: Selection) -> dict[str, Any]:
    """What a validated selection of a ``backend: runpod`` profile asks RunPod for (RunPodBackend.pod_request)."""
    offer = selection.profile.runpod
    if offer is None:
        raise ValueError(f"profile {selection.profile.slug!r} is not a runpod profile")
    return {
        "profile": selection.profile.slug,
        "gpu_types": list(selection.gpu_types),
        "gpu_count": selection.gpus,
        "cloud_type": offer.cloud_type,
        "image": offer.image,
        "container_disk_gb": offer.container_disk_gb,
        "volume_gb": offer.volume_gb,
        "volume_mount_path": offer.volume_mount_path,
        "network_volume_id": offer.network_volume_id,
        "max_price_per_hour": selection.price_cap_per_hour,
    }


def offers_within_cap(
    found: Sequence[tuple[str, GpuType | None]], count: int, cap: float, cloud_type: str
) -> tuple[list[tuple[GpuType, str, float]], list[str]]:
    """(GPU type, cloud, price per pod-hour) to try in order, and what was refused, in words, in the same order.

    ``found`` is each requested GPU type id with what RunPod said of it (None: it does not know the type); ``cap``
    is the highest price per pod-hour (0: none).
    """
    offers, refused = [], []
    for gpu_id, gpu in found:
        if gpu is None:
            refused.append(f"{gpu_id} (unknown to RunPod)")
            continue
        for cloud in CLOUDS[cloud_type]:
            price = gpu.price(cloud)
            if price is None:
                continue
            total = round(price * count, 4)
            if cap and total > cap:
                refused.append(f"{gpu.display_name} on {cloud_word(cloud)} cloud (${total:.2f}/h)")
                continue
            offers.append((gpu, cloud, total))
    return offers, refused


def price_rows(
    found: Mapping[str, GpuType | None], gpu_types: Sequence[str], gpu_count: int, cloud_type: str
) -> list[dict[str, Any]]:
    """The form's rows: per offered GPU type, its name and the lowest price per pod-hour in the profile's clouds."""
    rows = []
    for gpu_id in gpu_types:
        gpu = found.get(gpu_id)
        prices = [gpu.price(c) for c in CLOUDS[cloud_type]] if gpu else []
        offered = [p for p in prices if p]
        rows.append(
            {
                "id": gpu_id,
                "name": gpu.display_name if gpu else gpu_id,
                "price": round(min(offered) * gpu_count, 2) if offered else None,
            }
        )
    return rows
