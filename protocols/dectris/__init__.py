"""DECTRIS SIMPLON Stream V1/V2 ingest: schema, decode, simulated senders."""
