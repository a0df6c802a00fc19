# walcast: a Supabase Realtime compatible server.
#   docker build -t walcast .
#   docker run -p 4000:4000 -e API_JWT_SECRET=... -e DATABASE_URL=postgres://... walcast
# The build step is scripts/build-release, the same command CI runs.

FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
RUN scripts/build-release

FROM debian:bookworm-slim
# curl: the self-hosted Supabase compose file health-checks the realtime container with it.
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates curl \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --uid 10001 --home-dir /nonexistent --shell /usr/sbin/nologin walcast
COPY --from=build /src/target/release/walcast /usr/local/bin/walcast
USER walcast
ENV PORT=4000
EXPOSE 4000
HEALTHCHECK --interval=30s --timeout=5s --start-period=10s --retries=3 \
  CMD curl -fsS "http://127.0.0.1:${PORT}/healthcheck" || exit 1
ENTRYPOINT ["/usr/local/bin/walcast"]
CMD ["serve"]
