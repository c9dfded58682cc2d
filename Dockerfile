# The loopserve images: one binary (operator, gateway, worker) per image.
#
#   docker build --target gpu -t loopserve:gpu .   # workers on NVIDIA GPUs (CUDA runtime base)
#   docker build -t loopserve .                    # static, non-root: operator, gateway, CPU workers
#
# `make docker-build` builds both. The default tiny model is embedded for `loopserve up`; real
# models come from the LoopModel's volume (pvc / hostPath / image).

# Static build: CGO_ENABLED=0 with the nocuda tag links no libc (file(1): "statically linked", no
# NEEDED entries), so it runs on a base with no C library. Without the tag, purego (the CUDA
# backend's loader) makes even a CGO_ENABLED=0 binary ask for the dynamic loader; this binary runs
# the CPU engine, and --backend cuda there says it was built without the CUDA backend.
FROM golang:1.26 AS build
WORKDIR /src
COPY go.mod go.sum ./
RUN go mod download
COPY . .
RUN CGO_ENABLED=0 go build -tags nocuda -trimpath -ldflags "-s -w" -o /out/loopserve ./cmd/loopserve

# GPU build: dynamically linked against glibc so that cudakern (purego) can dlopen libcuda.so.1
# (mounted by the NVIDIA container runtime) and libnvrtc (in the CUDA runtime image). Built on
# bookworm (glibc 2.36) so that it runs on the newer glibc of the Ubuntu 24.04 CUDA base.
FROM golang:1.26-bookworm AS build-gpu
WORKDIR /src
COPY go.mod go.sum ./
RUN go mod download
COPY . .
RUN CGO_ENABLED=1 go build -trimpath -ldflags "-s -w" -o /out/loopserve ./cmd/loopserve

FROM nvidia/cuda:12.8.1-runtime-ubuntu24.04 AS gpu
COPY --from=build-gpu /out/loopserve /usr/local/bin/loopserve
# The CUDA images' ubuntu user is uid 1000; run as the same non-root uid as the static image.
USER 65532:65532
ENV NVIDIA_VISIBLE_DEVICES=all NVIDIA_DRIVER_CAPABILITIES=compute,utility
ENTRYPOINT ["/usr/local/bin/loopserve"]

# Last, so that a plain `docker build` makes it.
FROM gcr.io/distroless/static-debian12:nonroot AS cpu
COPY --from=build /out/loopserve /usr/local/bin/loopserve
USER 65532:65532
ENTRYPOINT ["/usr/local/bin/loopserve"]
