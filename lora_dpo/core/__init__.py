"""Pure tensor maths: the losses and their registry, completion log-probs of both batch layouts, and the
statistics that stay on the device. Nothing here knows a recipe, a file or a process."""
