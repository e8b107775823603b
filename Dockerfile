# The daemon, and iptables-legacy-save for the iptables probe's legacy backend (nftables and
# iptables-nft are read over netlink; the eBPF object is built into the binary).
FROM golang:1.26 AS build
WORKDIR /src
COPY go.mod go.sum ./
RUN go mod download
COPY . .
ARG VERSION=dev
ARG REVISION=unknown
RUN CGO_ENABLED=0 go build -trimpath -ldflags "-s -w -X main.version=${VERSION} -X main.revision=${REVISION}" \
    -o /endpointlag ./cmd/endpointlag

FROM debian:bookworm-slim
RUN apt-get update && apt-get install -y --no-install-recommends iptables && rm -rf /var/lib/apt/lists/*
COPY --from=build /endpointlag /endpointlag
ENTRYPOINT ["/endpointlag"]
