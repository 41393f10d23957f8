#!/bin/bash
# Run the rwcflow BIDS App on a SLURM cluster: the participant level as a job array (one task per
# participant, each on a GPU), then the group level as a job that starts when every task has ended.
#
#   bids_app/slurm/submit.sh BIDS_DIR OUTPUT_DIR WORK_DIR [rwcflow options...]
#
# Environment (all optional):
#   RWCFLOW_CONTAINER    the rwcflow Apptainer/Singularity image (.sif), run with --nv; empty: `rwcflow` on PATH
#   RWCFLOW_SBATCH_ARGS  sbatch options for both levels, e.g. "--partition=gpu --account=lab"
#   RWCFLOW_GPUS         GPUs per participant task (default 1; 0 for CPU-only nodes)
#   RWCFLOW_ARRAY_LIMIT  participants running at once (default: all)
#   RWCFLOW_GROUP        "no" to submit the participant level only
#
# Participants are the sub-* folders of BIDS_DIR, or those given with --participant-label (then the
# group template is built from those only). The group job
# depends on the array with afterany, so one failing participant does not hold the template back (the
# group level uses each participant's within-subject template, or its first T1w if it has none). Prints
# the job IDs; job logs go to WORK_DIR/slurm/, rwcflow's own logs to OUTPUT_DIR/logs/.
set -euo pipefail

die() { echo "submit.sh: $*" >&2; exit 2; }
[[ $# -ge 3 ]] || die "usage: submit.sh BIDS_DIR OUTPUT_DIR WORK_DIR [rwcflow options...]"
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
bids_dir=$(cd "$1" 2>/dev/null && pwd) || die "$1: not a folder"
mkdir -p "$2" "$3/slurm"
output_dir=$(cd "$2" && pwd) work_dir=$(cd "$3" && pwd)
shift 3

# Participants: those named with --participant-label (the array splits them), else every sub-* folder.
labels=() options=()
while [[ $# -gt 0 ]]; do
    case $1 in
        --participant-label|--participant_label)
            shift
            while [[ $# -gt 0 && $1 != -* ]]; do labels+=("${1#sub-}"); shift; done ;;
        *) options+=("$1"); shift ;;
    esac
done
group_options=("${options[@]}")
if [[ ${#labels[@]} -gt 0 ]]; then
    group_options+=(--participant-label "${labels[@]}")
else
    for folder in "$bids_dir"/sub-*/; do [[ -d $folder ]] && labels+=("$(basename "$folder" | sed 's/^sub-//')"); done
fi
[[ ${#labels[@]} -gt 0 ]] || die "$bids_dir: no sub-* folders"
printf '%s\n' "${labels[@]}" > "$work_dir/participants.txt"

read -r -a common <<< "${RWCFLOW_SBATCH_ARGS:-}"
gpus=${RWCFLOW_GPUS:-1}
gpu_args=()
[[ $gpus == 0 ]] || gpu_args=(--gres="gpu:$gpus")
array="1-${#labels[@]}${RWCFLOW_ARRAY_LIMIT:+%$RWCFLOW_ARRAY_LIMIT}"

participant_job=$(sbatch --parsable --job-name=rwcflow-participant --array="$array" \
    --output="$work_dir/slurm/participant-%A_%a.out" "${gpu_args[@]}" "${common[@]}" \
    "$here/rwcflow.sbatch" participant "$bids_dir" "$output_dir" "$work_dir" "${options[@]}")
echo "participant level: job array $participant_job (${#labels[@]} participants)"
[[ ${RWCFLOW_GROUP:-yes} == no ]] && exit 0

group_job=$(sbatch --parsable --job-name=rwcflow-group --dependency="afterany:$participant_job" \
    --output="$work_dir/slurm/group-%j.out" "${gpu_args[@]}" "${common[@]}" \
    "$here/rwcflow.sbatch" group "$bids_dir" "$output_dir" "$work_dir" "${group_options[@]}")
echo "group level: job $group_job (after $participant_job)"
