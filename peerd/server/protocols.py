"""libp2p protocol ids of the block service (one stream per inference session, or per RPCs)."""

INFERENCE_PROTOCOL = "/peerd/inference/1.0.0"
RPC_PROTOCOL = "/peerd/rpc/1.0.0"
