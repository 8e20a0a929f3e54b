"""The playground page `whale serve` serves at /playground (docs/playground.md): plain HTML, CSS and JavaScript,
no build step, no request to any other host."""
