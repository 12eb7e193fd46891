#!/usr/bin/env bash
# Copies the NHS design system's compiled CSS and the images it refers to from the npm
# package (pinned in package.json) into view/assets/nhsuk, which the binary embeds.
# Run after changing the nhsuk-frontend version: npm ci && ./vendor-nhsuk.sh
set -euo pipefail
cd "$(dirname "$0")"
source=node_modules/nhsuk-frontend/dist/nhsuk
target=../view/assets/nhsuk
version=$(node -p "require('./node_modules/nhsuk-frontend/package.json').version")
mkdir -p "$target/images"
cp "$source/nhsuk-frontend.min.css" "$target/nhsuk-frontend.min.css"
for image in $(grep -o 'url(/assets/images/[^)]*)' "$source/nhsuk-frontend.min.css" | sort -u | sed 's|url(/assets/images/||; s|)||'); do
  cp "$source/assets/images/$image" "$target/images/$image"
done
cp "$source/assets/images/favicon.svg" "$target/images/favicon.svg"
echo "$version" > "$target/VERSION"
echo "vendored nhsuk-frontend $version into $target"
