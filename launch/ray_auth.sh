# Sourced by the Ray launch scripts: Ray's token authentication on, with the token where Ray looks for it
# ($RAY_AUTH_TOKEN, else the file $RAY_AUTH_TOKEN_PATH, else ~/.ray/auth_token).
export RAY_AUTH_MODE=token

ray_token_path() { echo "${RAY_AUTH_TOKEN_PATH:-$HOME/.ray/auth_token}"; }

have_ray_token() { [ -n "${RAY_AUTH_TOKEN:-}" ] || [ -s "$(ray_token_path)" ]; }

# The head: a new token when none exists (Ray's own generator for its default path).
ensure_ray_token() {
    have_ray_token && return 0
    local path
    path=$(ray_token_path)
    if [ -z "${RAY_AUTH_TOKEN_PATH:-}" ]; then
        ray get-auth-token --generate >/dev/null
    else
        mkdir -p "$(dirname "$path")"
        (umask 077 && python3 -c 'import secrets; print(secrets.token_hex(32), end="")' >"$path")
    fi
    echo "created a Ray authentication token at $path; copy it to every worker node and job client" >&2
}

# Workers, drivers and job clients: the head's token must be here already.
require_ray_token() {
    have_ray_token && return 0
    echo "error: no Ray authentication token at $(ray_token_path): copy the head's token there" \
        "(or set RAY_AUTH_TOKEN / RAY_AUTH_TOKEN_PATH)" >&2
    exit 1
}
