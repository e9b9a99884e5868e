#!/usr/bin/env bash
# Renders the Kubernetes manifests (deploy/k8s: the base and each overlay) with kustomize, and
# validates every object against Kubernetes' schemas with kubernetes-validate --strict (from
# PyPI, installed into .tools/ of the checkout). Offline; run by `make test`. The renderer is
# `kustomize` if installed, else `kubectl kustomize`.
set -euo pipefail
root="$(cd "$(dirname "$0")/../.." && pwd)"
version=1.37.0
venv="$root/.tools/k8s-validate"
if ! [ -x "$venv/bin/kubernetes-validate" ] || ! "$venv/bin/pip" show kubernetes-validate 2>/dev/null | grep -q "^Version: $version"; then
  echo "installing kubernetes-validate $version from PyPI into $venv" >&2
  python3 -m venv "$venv" >&2
  "$venv/bin/pip" install --quiet --disable-pip-version-check "kubernetes-validate==$version" >&2
fi
if command -v kustomize >/dev/null; then
  render=(kustomize build)
elif command -v kubectl >/dev/null; then
  render=(kubectl kustomize)
else
  echo "deploy/k8s/validate.sh: neither kustomize nor kubectl is installed: cannot render the manifests" >&2
  exit 1
fi
out="$(mktemp -d)"
trap 'rm -rf "$out"' EXIT
for dir in base overlays/dev overlays/prod; do
  file="$out/${dir//\//-}.yaml"
  "${render[@]}" "$root/deploy/k8s/$dir" > "$file"
  "$venv/bin/kubernetes-validate" --strict --quiet "$file"
  echo "deploy/k8s/$dir: $(grep -c '^kind:' "$file") objects valid"
done
