"""Feature-map trunks built from torchvision backbones."""

__all__: list[str] = []
