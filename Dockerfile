# The ChatGPT component as a container: `sailor` (platform step, the default), `service`,
# `exec` or any other subcommand. Build: docker build -t chatgpt-component .

FROM rust:1-bookworm AS build
WORKDIR /src
# Dependencies first, so source edits do not rebuild them.
COPY Cargo.toml Cargo.lock ./
COPY fake-openai/Cargo.toml fake-openai/Cargo.toml
RUN mkdir -p src benches fake-openai/src \
 && echo 'fn main() {}' > src/main.rs && touch src/lib.rs \
 && echo 'fn main() {}' > benches/overhead.rs \
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
ENTRYPOINT ["/usr/local/bin/chatgpt-component"]
CMD ["sailor"]
