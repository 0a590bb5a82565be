"""The offline demo scenario built from real images that install as Debian packages (see README.md)."""

from curation.demo.build import build_demo_data
from curation.demo.config import DemoDataConfig

__all__ = ["DemoDataConfig", "build_demo_data"]
