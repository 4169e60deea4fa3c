# The ChatGPT component as a container: `sailor` (platform step, the default), `serve` (the HTTP
# gateway, port 8080; see deploy/), `service`, `exec` or any other subcommand.
# Build: docker build -t chatgpt-component .

FROM rust:1-bookworm AS build
WORKDIR /src
# Dependencies first, so source edits do not rebuild them.
COPY Cargo.toml Cargo.lock ./
COPY fake-openai/Cargo.toml fake-openai/Cargo.toml
# Every target the manifest names must exist, or cargo rejects it: stub each bench.
RUN mkdir -p src benches fake-openai/src \
 && echo 'fn main() {}' > src/main.rs && touch src/lib.rs \
 && for bench in overhead sailor_throughput gateway_load; do echo 'fn main() {}' > benches/$bench.rs; done \
 && touch fake-openai/src/lib.rs && echo 'fn main() {}' > fake-openai/src/main.rs \
 && cargo build --release --locked --bin chatgpt-component || true
COPY . .
RUN touch src/main.rs src/lib.rs \
 && cargo build --release --locked --bin chatgpt-component \
 && strip target/release/chatgpt-component

FROM debian:bookworm-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --uid 10001 --home-dir /nonexistent --shell /usr/sbin/nologin component
COPY --from=build /src/target/release/chatgpt-component /usr/local/bin/chatgpt-component
# component.json and the schemas are compiled into the binary; the platform reads the repo's copy.
USER 10001
# `serve` (the gateway) listens here when configured with `bind: 0.0.0.0`.
EXPOSE 8080
ENTRYPOINT ["/usr/local/bin/chatgpt-component"]
CMD ["sailor"]
