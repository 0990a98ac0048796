#!/usr/bin/env bash
# Side-by-side load test: the same smtp-source load through smtp-oauth-relay and through
# Postfix configured as a TLS + SASL smarthost client, both in front of the same sandbox
# "Gmail" (`smtp-oauth-relay sandbox`, with a benchmark-only AUTH PLAIN password because
# Postfix cannot do XOAUTH2 without a plugin).
#
# Needs: Postfix (smtp-source comes with it), run as root:
#   apt-get install postfix libsasl2-modules
# Usage: benches/postfix.sh [messages] [sessions] [size-bytes]
# Prints msgs/s delivered to the sandbox for each path. Ports 2525-2527, 2587, 8089 must be free.
set -euo pipefail
cd "$(dirname "$0")/.."

MSGS=${1:-20000}
SESSIONS=${2:-20}
SIZE=${3:-2048}

if ! command -v postfix >/dev/null || ! command -v smtp-source >/dev/null; then
  echo "postfix.sh: Postfix is not installed (apt-get install postfix libsasl2-modules); skipped"
  exit 0
fi
[ "$(id -u)" -eq 0 ] || { echo "postfix.sh: run as root (Postfix's own instance needs it)"; exit 1; }

cargo build --release --quiet
BIN=$PWD/target/release/smtp-oauth-relay
WORK=$(mktemp -d /tmp/postfix-bench.XXXXXX)
PIDS=()
cleanup() {
  postfix -c "$WORK/pf" stop >/dev/null 2>&1 || true
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  [ -n "${KEEP_WORK:-}" ] || rm -rf "$WORK"
}
trap cleanup EXIT

# The sandbox provider, counting messages in its log.
"$BIN" sandbox --smtp-listen 127.0.0.1:2587 --token-listen 127.0.0.1:8089 \
  --plain-password bench --state-dir "$WORK/sb" 2>"$WORK/sandbox.log" &
PIDS+=($!)
for _ in $(seq 50); do [ -f "$WORK/sb/config.toml" ] && break; sleep 0.1; done

delivered() { grep -o 'messages=[0-9]*' "$WORK/sandbox.log" | tail -1 | cut -d= -f2 || echo 0; }

# Waits until the sandbox has counted $1 messages; prints the seconds since $2 (epoch ns).
wait_for() {
  local want=$1 start=$2
  for _ in $(seq 6000); do
    [ "$(delivered)" -ge "$want" ] 2>/dev/null && break
    sleep 0.1
  done
  echo "scale=2; ($(date +%s%N) - $start) / 1000000000" | bc
}

run_load() { # label port base
  local label=$1 port=$2 base=$3
  local start; start=$(date +%s%N)
  smtp-source -s "$SESSIONS" -l "$SIZE" -m "$MSGS" -f bench@example.com -t sink@example.com "127.0.0.1:$port"
  local secs; secs=$(wait_for $((base + MSGS)) "$start")
  printf '| %s | %s | %s s |\n' "$label" "$(echo "scale=0; $MSGS / $secs" | bc)" "$secs"
}

echo "# $MSGS messages of $SIZE bytes, $SESSIONS smtp-source sessions (one connection per message), $(nproc) cores"
echo "| path | msgs/s delivered | time |"
echo "|---|---:|---:|"

# 1. smtp-oauth-relay, pool of 4 authenticated connections (the config the sandbox wrote).
"$BIN" run --config "$WORK/sb/config.toml" 2>"$WORK/relay.log" &
PIDS+=($!)
sleep 1
run_load "smtp-oauth-relay (pool 4, XOAUTH2)" 2525 0
kill "${PIDS[-1]}"; wait "${PIDS[-1]}" 2>/dev/null || true

# 2. Postfix as a TLS + SASL smarthost client of the same sandbox, with connection reuse.
mkdir -p "$WORK/pf" "$WORK/pf-spool" "$WORK/pf-data"
chmod 755 "$WORK"              # Postfix's unprivileged processes must reach their dirs
chown postfix "$WORK/pf-data"
cp /etc/postfix/master.cf "$WORK/pf/master.cf"
sed -i 's/^smtp      inet.*/127.0.0.1:2526 inet n - n - - smtpd/' "$WORK/pf/master.cf"
# smtp_tls_connection_reuse needs the tlsproxy service.
grep -q '^tlsproxy' "$WORK/pf/master.cf" || echo 'tlsproxy  unix  -       -       n       -       0       tlsproxy' >>"$WORK/pf/master.cf"
cat >"$WORK/pf/main.cf" <<EOF
compatibility_level = 3.6
queue_directory = $WORK/pf-spool
data_directory = $WORK/pf-data
mail_owner = postfix
setgid_group = postdrop
myhostname = postfix.bench
mydestination =
inet_interfaces = 127.0.0.1
inet_protocols = ipv4
mynetworks = 127.0.0.0/8
smtpd_relay_restrictions = permit_mynetworks, reject
relayhost = [127.0.0.1]:2587
smtp_tls_security_level = encrypt
smtp_tls_CAfile = $WORK/sb/sandbox-ca.pem
smtp_tls_connection_reuse = yes
smtp_sasl_auth_enable = yes
smtp_sasl_password_maps = static:relay@sandbox.test:bench
smtp_sasl_security_options = noanonymous
smtp_sasl_tls_security_options = noanonymous
smtp_destination_concurrency_limit = $SESSIONS
default_process_limit = 100
alias_maps =
alias_database =
maillog_file_prefixes = $WORK
maillog_file = $WORK/pf-data/maillog
EOF
postfix -c "$WORK/pf" check >/dev/null 2>&1 || true
if ! postfix -c "$WORK/pf" start >/dev/null 2>&1; then
  echo "postfix.sh: Postfix did not start; its log:"; cat "$WORK/pf-data/maillog" 2>/dev/null; exit 1
fi
sleep 2
run_load "Postfix $(postconf -d -h mail_version) (TLS + SASL smarthost, connection reuse)" 2526 "$MSGS"
