# sendbridge as a sidecar: one static binary in an otherwise empty image.
#   docker build -t sendbridge .
# deploy/verify-image.sh checks the runtime stage without a Docker engine.

FROM rust:1.95.0-bookworm AS build
WORKDIR /src
COPY . .
# crt-static links glibc into the binary: the runtime stage has no libc.
# The cache mounts keep crates and compiled dependencies between builds.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    RUSTFLAGS='-C target-feature=+crt-static' \
        cargo build --release --locked --target x86_64-unknown-linux-gnu \
 && mkdir -p /rootfs/usr/local/bin /rootfs/etc/ssl/certs /rootfs/etc/sendbridge/certs \
             /rootfs/var/spool /empty \
 && cp target/x86_64-unknown-linux-gnu/release/sendbridge /rootfs/usr/local/bin/ \
 && cp /etc/ssl/certs/ca-certificates.crt /rootfs/etc/ssl/certs/

FROM scratch
# The system roots for upstream TLS (the binary also bundles Mozilla's), and
# /etc/sendbridge/certs, root-owned: mount a certificate there, or the relay
# generates a self-signed one under the spool.
COPY --from=build /rootfs/ /
# The spool is the only place the relay writes; a new named volume takes
# this directory's owner. (/var/spool comes from /rootfs, so that only this
# last directory is created, and owned, by the copy.)
COPY --from=build --chown=65532:65532 /empty/ /var/spool/sendbridge/
# Environment wins over /etc/sendbridge/sendbridge.toml: change these with
# `-e`, not in the file. The file itself is optional.
ENV SENDBRIDGE_CONFIG=/etc/sendbridge/sendbridge.toml \
    SENDBRIDGE_SERVER__LISTEN=0.0.0.0:2525 \
    SENDBRIDGE_SPOOL__DIR=/var/spool/sendbridge \
    SENDBRIDGE_TLS__CERT=/etc/sendbridge/certs/sendbridge.crt \
    SENDBRIDGE_TLS__KEY=/etc/sendbridge/certs/sendbridge.key \
    SENDBRIDGE_LOG__FORMAT=json
# Relative paths in a mounted configuration resolve inside the spool volume.
WORKDIR /var/spool/sendbridge
VOLUME ["/var/spool/sendbridge"]
USER 65532:65532
EXPOSE 2525
HEALTHCHECK --interval=30s --timeout=5s --start-period=10s --retries=3 \
    CMD ["/usr/local/bin/sendbridge", "health"]
ENTRYPOINT ["/usr/local/bin/sendbridge"]
CMD ["run"]
