#!/usr/bin/env bash
# One command: install (first time only) and start the dashboard on the offline defaults.
#
#   bash scripts/start.sh            only this machine can open it (http://127.0.0.1:8501)
#   bash scripts/start.sh --share    everyone on the network can reach it, with an access token:
#                                    $VPTDASH_TOKEN if set, else a new one printed below
# Other arguments go to `streamlit run` (e.g. --server.port 8600).
set -euo pipefail
cd "$(dirname "$0")/.."
share=0
args=()
for arg in "$@"; do
    if [[ "$arg" == "--share" ]]; then share=1; else args+=("$arg"); fi
done
bash scripts/setup.sh requirements.txt
if [[ "$share" == 1 ]]; then
    if [[ -z "${VPTDASH_TOKEN:-}" ]]; then
        VPTDASH_TOKEN="$(.venv/bin/python -c 'import secrets; print(secrets.token_urlsafe(16))')"
    fi
    if (( ${#VPTDASH_TOKEN} < 12 )); then
        echo "error: VPTDASH_TOKEN must be at least 12 characters" >&2
        exit 2
    fi
    export VPTDASH_SHARE=1 VPTDASH_TOKEN
    echo "Sharing on the network. Access token (give it only to the people in the meeting): $VPTDASH_TOKEN" >&2
    exec .venv/bin/python -m streamlit run app.py --browser.gatherUsageStats false \
        --server.address 0.0.0.0 --client.showErrorDetails none "${args[@]+"${args[@]}"}"
fi
exec .venv/bin/python -m streamlit run app.py --browser.gatherUsageStats false "${args[@]+"${args[@]}"}"
