"""The label table that TotalSegmentator stores in a NIfTI header extension (``--ml`` output).

TotalSegmentator writes a Caret/Workbench ``LabelTable`` XML document as a NIfTI-1 extension with code 0;
its own ``load_multilabel_nifti`` and viewers such as Connectome Workbench read it back. The same layout is
written here so that either tool reads the other's files.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from collections.abc import Mapping

import nibabel as nib

#: TotalSegmentator's colour cycle (RGB 0..255), indexed by ``label_id % 12``.
_COLOURS = (
    (255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0), (255, 0, 255), (0, 255, 255),
    (255, 128, 0), (255, 0, 128), (128, 255, 128), (0, 128, 255), (128, 128, 128), (185, 170, 155),
)


def label_table_xml(label_map: Mapping[int, str]) -> str:
    """The Caret LabelTable XML for ``{label_id: name}`` (same content and colours as TotalSegmentator)."""
    rows = []
    for label_id, name in label_map.items():
        r, g, b = _COLOURS[int(label_id) % len(_COLOURS)]
        rows.append(
            f'<Label Key="{int(label_id)}" Red="{r / 255}" Green="{g / 255}" Blue="{b / 255}" Alpha="1">'
            f"<![CDATA[{name}]]></Label>\n"
        )
    head = ('<?xml version="1.0" encoding="UTF-8"?> <CaretExtension>  <Date><![CDATA[2013-07-14T05:45:09]]>'
            '</Date>   <VolumeInformation Index="0">   <LabelTable>')
    tail = ("  </LabelTable>  <StudyMetaDataLinkSet>  </StudyMetaDataLinkSet>  <VolumeType><![CDATA[Label]]>"
            "</VolumeType>   </VolumeInformation></CaretExtension>")
    return head + "\n" + "".join(rows) + "\n" + tail + "\n              "


def add_label_table(img: nib.Nifti1Image, label_map: Mapping[int, str]) -> nib.Nifti1Image:
    """Append the label table extension (code 0) to ``img``'s header, in place; returns ``img``."""
    img.header.extensions.append(nib.nifti1.Nifti1Extension(0, label_table_xml(label_map).encode("utf-8")))
    return img


def read_label_table(img: nib.Nifti1Image) -> dict[int, str]:
    """Read ``{label_id: name}`` from a TotalSegmentator-style label table extension; ``{}`` if none."""
    for ext in img.header.extensions:
        content = ext.get_content()
        if isinstance(content, bytes) and b"LabelTable" in content:
            try:
                root = ET.fromstring(content.decode("utf-8").strip())
            except ET.ParseError:
                continue
            return {
                int(el.attrib["Key"]): (el.text or "").strip()
                for el in root.iter("Label")
                if "Key" in el.attrib
            }
    return {}
