"""What the report, the filter and the calibration share to show things: text (labels, numbers, Markdown
cells), Pillow charts (tick steps, axes, labels) and HTML (escaping, the page, tables). Below all three; imports
none of them."""
