"""The service catalog: built-in TOML plus the operator's file, and the tier policy.

Where services run is the coordinator's scheduler (``rma.coordinator.scheduler``).
"""

from rma.catalog.loader import Catalog, CatalogError, load_catalog
from rma.catalog.tiers import TierPolicy, TierRefused

__all__ = ["Catalog", "CatalogError", "TierPolicy", "TierRefused", "load_catalog"]
