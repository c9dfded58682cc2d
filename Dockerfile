# The loopserve image: one static binary (operator, worker, gateway) on a minimal non-root base.
# The default tiny model is embedded for `loopserve up`; real models come from the LoopModel's
# volume (pvc / hostPath / image).
FROM golang:1.26 AS build
WORKDIR /src
COPY go.mod go.sum ./
RUN go mod download
COPY . .
RUN CGO_ENABLED=0 go build -trimpath -ldflags "-s -w" -o /out/loopserve ./cmd/loopserve

FROM gcr.io/distroless/static-debian12:nonroot
COPY --from=build /out/loopserve /usr/local/bin/loopserve
USER 65532:65532
ENTRYPOINT ["/usr/local/bin/loopserve"]
