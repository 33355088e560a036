#!/bin/sh
# The orchestrator image's entry point. LIVEDIFF_RUNNER picks what go-livepeer talks to:
#   ai-runner (default)  livediff-airunner: livediff's pipeline inside ai-runner's app
#   native               livediff runner: livediff answering the live runner contract itself
#                        (trickle in and out, no ai-runner in the path)
#   live-runner          livediff serve: a go-livepeer (>= 0.9) Live Runner; it registers itself
#                        when LIVEDIFF_LIVE_RUNNER_ORCH/_URL/_SECRET are set (static: runners.json)
# Only the image's default command (livediff-airunner) is switched: prepare mode (PREPARE_MODELS=1
# or --prepare-models) is the same in both modes, and any other command (livediff serve, a
# shell) runs as given. See docs/orchestrator.md.
set -eu

mode="${LIVEDIFF_RUNNER:-ai-runner}"
case "$mode" in
    ai-runner | native | live-runner) ;;
    *)
        echo "livediff-entrypoint: LIVEDIFF_RUNNER must be 'ai-runner', 'native' or" \
            "'live-runner', not '$mode'" >&2
        exit 2
        ;;
esac

if [ "$#" -eq 0 ]; then
    set -- livediff-airunner
fi

preparing=false
if [ "${PREPARE_MODELS:-0}" = 1 ]; then
    preparing=true
fi
for argument in "$@"; do
    if [ "$argument" = --prepare-models ]; then
        preparing=true
    fi
done

if [ "$mode" = native ] && [ "$1" = livediff-airunner ] && [ "$preparing" = false ]; then
    shift
    # ai-runner's HOST and PORT, so that both modes listen where go-livepeer looks
    exec livediff runner --host "${HOST:-0.0.0.0}" --port "${PORT:-8000}" "$@"
fi
if [ "$mode" = live-runner ] && [ "$1" = livediff-airunner ] && [ "$preparing" = false ]; then
    shift
    exec livediff serve --host "${HOST:-0.0.0.0}" --port "${PORT:-8000}" "$@"
fi
exec "$@"
