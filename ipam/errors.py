"""The IPAM exception hierarchy: adapters translate library errors into these, callers into messages."""

from __future__ import annotations


class IPAMError(Exception):
    """Base of every error the IPAM package raises on purpose."""


class InvalidResource(IPAMError):
    """A resource (pool, config) failed validation; names the resource, field and reason."""

    def __init__(self, kind: str, name: str, field: str, reason: str) -> None:
        self.kind = kind
        self.name = name
        self.field = field
        self.reason = reason
        # A field name from the document is shown escaped when it holds control characters: one line, always.
        shown = field if field.isprintable() else repr(field)
        super().__init__(f"{kind} {name!r}: field {shown}: {reason}")


class ResourceExists(IPAMError):
    """Create of a resource that is already present."""


class ResourceNotFound(IPAMError):
    """Update or delete of a resource that is absent."""


class PoolExhausted(IPAMError):
    """No address can be handed out under the current pools and IPAM configuration."""


class NoEligiblePool(IPAMError):
    """No enabled pool of the requested family matches the node (nodeSelector) or the request."""


class AddressNotInPool(IPAMError):
    """A specific address was requested that lies in no enabled pool."""


class AddressInUse(IPAMError):
    """A specific address was requested that is already allocated."""


class ConflictRetriesExhausted(IPAMError):
    """Compare-and-swap kept failing: too many concurrent writers on the same keys."""


class DatastoreError(IPAMError):
    """The datastore failed in a way retries did not cure."""


class DatastoreUnavailable(DatastoreError):
    """No etcd endpoint answered."""
