#!/usr/bin/env bash
# Makes the credentials of the docker compose stack (run once from anywhere, then `docker compose up`):
#   - .env (mode 600, next to docker-compose.yml): a random NATS password per service user
#     (LS_NATS_PW_<USER>), the Redis ACL user's password (LS_REDIS_PASSWORD) and LS_TENANTS_DIR;
#   - .work/compose/tenants/tenants.yaml: a development tenant `dev` (only its key's digest);
#   - .work/compose/dev-api-key (mode 600): that tenant's API key, for clients and the playground.
# Never commit .env. An existing .env is kept unless --force (new passwords: restart the stack).
# ENV_FILE and STATE_DIR override the two locations.
set -eu

cd "$(dirname "$0")/.."
ENV_FILE="${ENV_FILE:-.env}"
STATE_DIR="${STATE_DIR:-.work/compose}"
case "$STATE_DIR" in /*|./*|../*) ;; *) STATE_DIR="./$STATE_DIR" ;; esac  # compose: a bind path
# The NATS users: exactly the keys of livestage.security.nats_permissions.NATS_USERS.
USERS="encoder generator refiner decoder dialogue tts publisher session playground"

if [ -e "$ENV_FILE" ] && [ "${1:-}" != "--force" ]; then
  echo "$ENV_FILE exists; keeping it (pass --force to make new credentials)" >&2
  exit 0
fi

random() {  # random CHARSET LENGTH
  LC_ALL=C tr -dc "$1" </dev/urandom 2>/dev/null | head -c "$2" || true
}
password() {  # a letter first, then letters and digits: nats.conf reads it as a plain string
  printf '%s%s' "$(random A-Za-z 1)" "$(random A-Za-z0-9 31)"
}
sha256() {
  if command -v sha256sum >/dev/null 2>&1; then sha256sum | cut -d' ' -f1; else shasum -a 256 | cut -d' ' -f1; fi
}

umask 077
mkdir -p "$STATE_DIR/tenants"
chmod 755 "$STATE_DIR/tenants"   # the services run as uid 10001: they must read the tenants file
key="lsk_$(random A-Za-z0-9 43)"
digest="$(printf '%s' "$key" | sha256)"
cat >"$STATE_DIR/tenants/tenants.yaml" <<YAML
# Tenants of the compose stack's session API (key digests only). Add one with
#   livestage tenant add NAME --file $STATE_DIR/tenants/tenants.yaml
tenants:
  - id: dev
    key_sha256: $digest
    max_sessions: 16
    max_session_seconds: 3600
    calls_per_second: 100
    call_burst: 200
YAML
chmod 644 "$STATE_DIR/tenants/tenants.yaml"
printf '%s\n' "$key" >"$STATE_DIR/dev-api-key"

tmp="$ENV_FILE.tmp.$$"
{
  echo "# docker compose credentials made by deploy/compose-env.sh: never commit this file."
  for user in $USERS; do
    echo "LS_NATS_PW_$(printf '%s' "$user" | tr '[:lower:]-' '[:upper:]_')=$(password)"
  done
  echo "LS_REDIS_PASSWORD=$(password)"
  echo "LS_TENANTS_DIR=$STATE_DIR/tenants"
} >"$tmp"
mv "$tmp" "$ENV_FILE"
echo "wrote $ENV_FILE and $STATE_DIR/tenants/tenants.yaml; the dev tenant's API key is in $STATE_DIR/dev-api-key" >&2
