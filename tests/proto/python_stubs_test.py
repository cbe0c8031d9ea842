#!/usr/bin/python3
"""The Python client generated from proto/ (Debian's python3-grpcio + protobuf) imports, builds
every public request and round-trips it; the service stubs exist with the expected methods."""
import sys

sys.path.insert(0, sys.argv[1])
from splitmoe.v1 import generation_pb2, generation_pb2_grpc, internal_pb2, internal_pb2_grpc  # noqa: E402

req = generation_pb2.GenerateRequest(request_id="r1", text="hello",
                                     sampling=generation_pb2.SamplingParams(temperature=0.5, seed=7),
                                     stop=generation_pb2.StopConditions(max_tokens=8, stop=["\n"]), logprobs=2)
back = generation_pb2.GenerateRequest.FromString(req.SerializeToString())
assert back == req and back.WhichOneof("prompt") == "text", back
assert hasattr(generation_pb2_grpc, "GenerationStub")
for method in ["Generate", "Tokenize", "Detokenize", "ModelInfo"]:
    assert method in generation_pb2.DESCRIPTOR.services_by_name["Generation"].methods_by_name, method
assert internal_pb2.DESCRIPTOR.services_by_name["Registry"].methods_by_name["WatchRoutingTable"].server_streaming
assert hasattr(internal_pb2_grpc, "ExpertComputeStub")
print("1 passed, 0 failed")
