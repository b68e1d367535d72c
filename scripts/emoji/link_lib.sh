# Sourced by the scripts that assemble bundled folders from trained ones (spatext_folder.sh, scene_folder.sh,
# unclip_folders.sh): replacing a copied part by a relative link only when the copy equals the link's target.
# LINK_WHO names the calling script in messages.

# same_tree A B: the regular files under A and B are the same names with the same bytes.
same_tree() {
  local a=$1 b=$2 f
  [ "$( (cd "$a" && find -L . -type f | sort) )" = "$( (cd "$b" && find -L . -type f | sort) )" ] || return 1
  while read -r f; do cmp -s "$a/$f" "$b/$f" || return 1; done < <(cd "$a" && find -L . -type f)
}
# link FOLDER PART TARGET COPY: FOLDER/PART -> TARGET (relative to FOLDER) after checking COPY equals it.
link() {
  local folder=$1 part=$2 target=$3 copy=$4
  same_tree "$copy" "$folder/$target" || {
    echo "${LINK_WHO:-link}: $copy differs from $folder/$target: not linked" >&2
    exit 1
  }
  ln -s "$target" "$folder/$part"
}
