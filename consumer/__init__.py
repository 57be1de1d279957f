"""The node service: group membership, claims, leases, reaper, cancel, storage, events, ops.

Imports only `schemas` and `pipeline` among our packages.
"""
