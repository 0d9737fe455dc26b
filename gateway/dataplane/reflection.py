"""Server reflection that grpcurl's `describe` can use.

grpcurl asks for a method by its full name (inference.GRPCInferenceService.ModelInfer); the
protobuf 7 (upb) descriptor pool does not index methods, so grpcio-reflection answers NOT_FOUND
and `grpcurl describe` fails. This servicer falls back to the enclosing service's file.
"""

from __future__ import annotations

from grpc_reflection.v1alpha import _async, reflection, reflection_pb2_grpc

SERVICE_NAME = reflection.SERVICE_NAME


class ReflectionServicer(_async.ReflectionServicer):
    def _file_containing_symbol(self, request, fully_qualified_name):
        try:
            self._pool.FindFileContainingSymbol(fully_qualified_name)
        except KeyError:
            service, _, method = fully_qualified_name.rpartition(".")
            try:
                if method in self._pool.FindServiceByName(service).methods_by_name:
                    fully_qualified_name = service
            except KeyError:
                pass
        return super()._file_containing_symbol(request, fully_qualified_name)


def enable(service_names, server) -> None:
    reflection_pb2_grpc.add_ServerReflectionServicer_to_server(
        ReflectionServicer(service_names), server
    )
