# A static binary on an empty base: the daemon needs no files but its service-account token.
FROM golang:1.26 AS build
WORKDIR /src
COPY go.mod go.sum ./
RUN go mod download
COPY . .
ARG VERSION=dev
ARG REVISION=unknown
RUN CGO_ENABLED=0 go build -trimpath -ldflags "-s -w -X main.version=${VERSION} -X main.revision=${REVISION}" \
    -o /endpointlag ./cmd/endpointlag

FROM scratch
COPY --from=build /endpointlag /endpointlag
USER 65534:65534
ENTRYPOINT ["/endpointlag"]
