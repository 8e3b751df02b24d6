"""The shipper: every finished profile, spooled on disk, to a Parca- or Conprof-compatible store
over gRPC, with the binaries' debuginfo (see service.py for the loops)."""
