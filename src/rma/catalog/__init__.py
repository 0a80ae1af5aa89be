"""The service catalog: built-in TOML plus the operator's file, and the tier policy."""

from rma.catalog.assign import assign, fits
from rma.catalog.loader import Catalog, CatalogError, load_catalog
from rma.catalog.tiers import TierPolicy, TierRefused

__all__ = ["Catalog", "CatalogError", "TierPolicy", "TierRefused", "assign", "fits", "load_catalog"]
