#!/bin/sh
# etcd's users and roles for elasticd, then authentication on: each daemon kind may
# write only the prefixes it owns (elasticd/coord/access.py is the plan this applies;
# tests/test_deploy_manifests.py runs this script against a real etcd and checks it).
#
#   elasticd-controller  readwrite <prefix>/controller/election/, jobs/, assign/
#                        read      <prefix>/nodes/, ps/, workers/
#   elasticd-ps          readwrite <prefix>/ps/            read <prefix>/controller/election/
#   elasticd-agent       readwrite <prefix>/nodes/, workers/, drain/
#                        read      <prefix>/assign/, controller/election/
#   elasticd-client      read      <prefix>/controller/election/   (password: finds the controller)
#
# The daemons' users have no password: etcd runs with --client-cert-auth and takes a
# client certificate's common name as the user, so a daemon's certificate
# (CN elasticd-controller, elasticd-ps, elasticd-agent) is its etcd credential. root
# has none either: it is whoever holds the certificate with CN root (this script's).
#
# Environment: ETCDCTL_ENDPOINTS, ETCDCTL_CACERT, ETCDCTL_CERT, ETCDCTL_KEY (read by
# etcdctl), ELASTICD_PREFIX (default /elasticd), ETCD_CLIENT_PASSWORD_FILE.
# Safe to run again: what exists is kept.
set -eu

PREFIX="${ELASTICD_PREFIX:-/elasticd}"
CLIENT_PASSWORD="$(cat "${ETCD_CLIENT_PASSWORD_FILE:?the file holding the password of elasticd-client}")"

# etcdctl "$@", where "already exists" or "already granted" is success
step() {
  if ! out="$(etcdctl "$@" 2>&1)"; then
    case "$out" in
      *"already exists"* | *"already granted"*) ;;
      *) echo "etcdctl $1 $2 $3: $out" >&2; exit 1 ;;
    esac
  fi
}

# grant USER PERMISSION PREFIX...: to the role named like USER
grant() {
  user="$1" permission="$2"
  shift 2
  for prefix in "$@"; do
    step role grant-permission "$user" --prefix=true "$permission" "$PREFIX/$prefix"
  done
}

# account USER: a user and its own role, both named USER
account() {
  if [ "$1" = elasticd-client ]; then
    step user add "$1" --new-user-password="$CLIENT_PASSWORD"
  else
    step user add "$1" --no-password
  fi
  step role add "$1"
  step user grant-role "$1" "$1"
}

step user add root --no-password
step user grant-role root root

account elasticd-controller
grant elasticd-controller readwrite controller/election/ jobs/ assign/
grant elasticd-controller read nodes/ ps/ workers/

account elasticd-ps
grant elasticd-ps readwrite ps/
grant elasticd-ps read controller/election/

account elasticd-agent
grant elasticd-agent readwrite nodes/ workers/ drain/
grant elasticd-agent read assign/ controller/election/

account elasticd-client
grant elasticd-client read controller/election/

step auth enable
echo "etcd: users and roles of elasticd in place under $PREFIX; authentication on"
